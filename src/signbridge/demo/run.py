"""``signbridge demo``: the whole path a signature takes, on the embedded default, in one command.

A demo service with the Demo Corp organization; a signature with each of its keys through
``SignHash``; a timestamp; then the crypto provider (``signbridge start``) serving those keys as a
PKCS#11 token that openssl, codesign (an app and the disk image it ships in) and productsign sign
through; every result verified and the audit log checked.
"""

from __future__ import annotations

import json
import os
import plistlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pydmg
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .. import jarsigning
from ..api import ServiceClient
from ..crypto.certificate_files import read_certificates
from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import (
    EcdsaFormat,
    Scheme,
    SignatureRequest,
    verify_certificate_signature,
    verify_digest_signature,
)
from ..crypto.timestamp_requests import request_timestamp
from ..errors import SignbridgeError
from ..p11kit import client_module_path
from ..server.process import ServiceProcess
from .component import build_component_package

Echo = Callable[[str], None]
TOKEN_NAME = "signbridge-demo"
DEMO_TEAM_ID = "DEMOTEAM01"


class DemoError(SignbridgeError):
    """A step of the demo failed; the message says which and why."""


def _signbridge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signbridge", *args], capture_output=True, text=True, env=env, check=False)


def _checked(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise DemoError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


@dataclass
class Demo:
    echo: Echo
    workdir: Path
    info: dict | None = None
    service: ServiceProcess | None = None
    step: int = 0

    def say(self, text: str) -> None:
        self.step += 1
        self.echo(f"{self.step}. {text}")

    def detail(self, text: str) -> None:
        self.echo(f"   {text}")

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def root_certificate(self) -> x509.Certificate:
        assert self.info is not None
        return read_certificates(Path(self.info["rootCertificate"]), role="demo root certificate")[0]

    def provider_env(self) -> dict[str, str]:
        """What a build machine sets to use the demo service: SignPath's variables, plus where the
        token keeps its socket and log, the trust anchor and the TSA for the Apple tools."""
        assert self.info is not None and self.service is not None
        return {
            **os.environ,
            "SIGNPATH_API_URL": self.service.api_url,
            "SIGNPATH_ORGANIZATION_ID": self.info["organizationId"],
            "SIGNPATH_API_TOKEN": self.info["apiToken"],
            "SIGNBRIDGE_RUNTIME_DIR": str(self.workdir / "run"),
            "SIGNPATH_LOG_FILE_DIRECTORY": str(self.workdir / "logs"),
            "SIGNBRIDGE_ANCHORS": self.info["rootCertificate"],
            "SIGNBRIDGE_TIMESTAMP_URL": f"{self.service.api_url}/timestamp",
        }

    # The signing service

    def create_organization(self) -> None:
        self.say(f"Creating a data directory with the Demo Corp organization in {self.data_dir}")
        out = _checked(_signbridge("server", "init", "--demo", "--json", "--data-dir", str(self.data_dir)),
                       "creating the demo organization")
        self.info = json.loads(out)
        self.detail(f"organization {self.info['organizationId']}, project 'demo', CI user '{self.info['ciUser']}'")

    def sign_through_the_api(self, client: ServiceClient) -> None:
        policies = client.my_signing_policies()
        self.say(f"The CI user may sign with {len(policies)} signing policies:")
        for policy in policies:
            self.detail(f"{policy.key_id:<28} {policy.key_type} {policy.key_size}  {policy.certificate.subject.rfc4514_string()}")
        self.say("Signing a SHA-256 digest with each policy through SignHash; only the digest leaves this machine")
        digest = HashAlgorithm.SHA256.digest(b"signbridge demo " + secrets.token_bytes(16))
        for policy in policies:
            scheme = Scheme.ECDSA if policy.key_type == "Ecdsa" else Scheme.RSA_PKCS1
            request = SignatureRequest(digest, HashAlgorithm.SHA256, scheme, EcdsaFormat.IEEE)
            signature = client.sign_hash(policy.project_slug, policy.signing_policy_slug, request, {"demo": True})
            verify_digest_signature(policy.certificate.public_key(), request, signature)
            for issuer, subject in zip(policy.chain, (policy.certificate, *policy.chain), strict=False):
                verify_certificate_signature(subject, issuer)
            self.detail(f"{policy.key_id:<28} {len(signature)}-byte {scheme.value} signature verified against its certificate and chain")
        self.say("Timestamping the digest with the service's RFC 3161 authority")
        assert self.service is not None
        token = request_timestamp(f"{self.service.api_url}/timestamp", digest, HashAlgorithm.SHA256)
        token.verify(digest, HashAlgorithm.SHA256, [self.root_certificate])
        self.detail(f"timestamp {token.gen_time.isoformat()} (serial {token.serial}) verified against the demo root")

    # The crypto provider

    def start_token(self) -> dict:
        self.say("Starting the crypto provider: the demo's certificates become a PKCS#11 token")
        out = _checked(_signbridge("start", "--name", TOKEN_NAME, env=self.provider_env()), "signbridge start")
        self.detail(out.splitlines()[0])
        status = json.loads(_checked(_signbridge("status", "--json", env=self.provider_env()), "signbridge status"))
        (record,) = [token for token in status["tokens"] if token["name"] == TOKEN_NAME]
        self.say("Identities on the running token, as `signbridge security find-identity -v` lists them:")
        identities = _checked(_signbridge("security", "find-identity", "-v", env=self.provider_env()), "find-identity")
        for line in identities.splitlines():
            self.detail(line.strip())
        return record

    def sign_through_the_token(self, record: dict) -> None:
        module = client_module_path()
        if module is None:
            raise DemoError("p11-kit-client.so is not installed (Debian package p11-kit-modules)")
        self.say("Signing a file with openssl's pkcs11 engine through the token (one SignHash per signature)")
        message = self.workdir / "message.txt"
        message.write_text("Released by the Demo Corp build pipeline.\n")
        signature, public_key = self.workdir / "message.sig", self.workdir / "release-signing.pub.pem"
        certificate = self._policy_certificate("release-signing")
        public_key.write_bytes(certificate.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        env = {**self.provider_env(), "PKCS11_MODULE_PATH": module, "P11_KIT_SERVER_ADDRESS": f"unix:path={record['socket']}"}
        key_uri = "pkcs11:object=demo%2Frelease-signing;type=private;pin-value=CONFIG"
        sign = ["openssl", "dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign", key_uri,
                "-out", str(signature), str(message)]
        self.detail("$ " + " ".join(sign).replace(key_uri, f"'{key_uri}'"))
        _checked(subprocess.run(sign, capture_output=True, text=True, env=env, check=False), "openssl dgst -sign")
        verify = ["openssl", "dgst", "-sha256", "-verify", str(public_key), "-signature", str(signature), str(message)]
        out = _checked(subprocess.run(verify, capture_output=True, text=True, check=False), "openssl dgst -verify")
        self.detail(f"openssl dgst -verify with the certificate's public key: {out.strip()}")

    def sign_jar(self, record: dict) -> None:
        self.say("Signing a jar with Java's jarsigner through the token (SunPKCS11 loading p11-kit-client.so)")
        token = jarsigning.JavaToken.write(self.workdir, TOKEN_NAME, record["socket"])
        jar = jarsigning.write_sample_jar(self.workdir / "app.jar", {"com/democorp/app/release.txt": b"Demo Corp release\n"})
        signed = self.workdir / "app-signed.jar"
        assert self.service is not None
        self.detail(f"$ jarsigner -addprovider SunPKCS11 -providerArg {token.config.name} -storetype PKCS11 -keystore NONE "
                    f"-storepass CONFIG -tsa {self.service.api_url}/timestamp -signedjar {signed.name} {jar.name} demo/release-signing")
        out = jarsigning.sign_jar(token, jar, signed, "demo/release-signing", tsa_url=f"{self.service.api_url}/timestamp")
        self.detail(f"  {out.strip().splitlines()[0]}")
        assert self.info is not None
        trust = jarsigning.truststore(self.workdir / "demo-trust.p12", {"demo-root": Path(self.info["rootCertificate"])})
        verified = jarsigning.verify_jar(signed, trust)
        shown = [line.strip() for line in verified.splitlines() if line.strip().startswith(("- Signed by", "Timestamped by"))]
        for line in [*shown, "jar verified."]:
            self.detail(f"  jarsigner -verify -strict: {line}")

    # Apple's tools, through the token

    def build_sample_app(self) -> Path:
        """MyApp.app: a universal executable and a nested Demo.framework (versioned layout), from the
        binaries the project built with clang and ld64.lld (scripts/build_demo_binaries.py)."""
        binaries = resources.files("signbridge.demo") / "demo_app"
        app = self.workdir / "MyApp.app"
        if app.exists():
            shutil.rmtree(app)
        contents = app / "Contents"
        (contents / "MacOS").mkdir(parents=True)
        (contents / "Resources").mkdir()
        (contents / "Info.plist").write_bytes(plistlib.dumps({
            "CFBundleExecutable": "MyApp", "CFBundleIdentifier": "com.democorp.MyApp", "CFBundleName": "MyApp",
            "CFBundlePackageType": "APPL", "CFBundleShortVersionString": "1.0", "CFBundleVersion": "1",
            "LSMinimumSystemVersion": "11.0",
        }))
        (contents / "MacOS" / "MyApp").write_bytes((binaries / "MyApp").read_bytes())
        (contents / "Resources" / "Readme.txt").write_text("MyApp, signed by signbridge.\n")
        version = contents / "Frameworks" / "Demo.framework" / "Versions" / "A"
        (version / "Resources").mkdir(parents=True)
        (version / "Demo").write_bytes((binaries / "Demo").read_bytes())
        (version / "Resources" / "Info.plist").write_bytes(plistlib.dumps({
            "CFBundleExecutable": "Demo", "CFBundleIdentifier": "com.democorp.Demo", "CFBundlePackageType": "FMWK",
            "CFBundleShortVersionString": "1.0",
        }))
        framework = version.parent.parent
        os.symlink("A", framework / "Versions" / "Current")
        os.symlink("Versions/Current/Demo", framework / "Demo")
        os.symlink("Versions/Current/Resources", framework / "Resources")
        for executable in (contents / "MacOS" / "MyApp", version / "Demo"):
            executable.chmod(0o755)
        return app

    def _run_tool(self, *args: str, show: str = "stdout+stderr", expect: tuple[int, ...] = (0,)) -> str:
        self.detail("$ signbridge " + " ".join(f"'{a}'" if " " in a else a for a in args))
        proc = _signbridge(*args, env=self.provider_env())
        output = (proc.stdout if "stdout" in show else "") + (proc.stderr if "stderr" in show else "")
        for line in output.splitlines():
            self.detail("  " + line.replace(str(self.workdir) + "/", ""))
        if proc.returncode not in expect:
            raise DemoError(f"signbridge {args[0]} exited {proc.returncode}")
        return output

    def codesign_app(self, app: Path) -> None:
        self.say("Signing MyApp.app (universal executable, nested framework) with codesign through the token")
        self._run_tool("codesign", "-s", "Developer ID Application", "--timestamp", "--options", "runtime", "--deep",
                       "-v", str(app))
        self.say("Verifying it as Apple's codesign would, against the demo root (SIGNBRIDGE_ANCHORS)")
        self._run_tool("codesign", "--verify", "--strict", "--deep", "--verbose=2", str(app))
        self.say("What the signature holds (codesign -dvvv)")
        self._run_tool("codesign", "-dvvv", str(app))

    def codesign_disk_image(self, app: Path) -> None:
        self.say("Putting the signed app in a disk image (pydmg's UDIF writer) and signing the image")
        folder = self.workdir / "MyApp"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copytree(app, folder / app.name, symlinks=True)
        image = self.workdir / "MyApp.dmg"
        image.unlink(missing_ok=True)
        pydmg.create_dmg(source_dir=folder, output_path=image, volume_label="MyApp", total_sectors=32768)
        shutil.rmtree(folder)
        self._run_tool("codesign", "-s", "Developer ID Application", "--timestamp", "-v", str(image))
        self._run_tool("codesign", "--verify", "--strict", "--verbose=2", str(image))
        self._run_tool("codesign", "-dvvv", str(image))

    def productsign_app(self, app: Path) -> None:
        self.say("Wrapping the signed app in a component package and signing it with the installer identity")
        unsigned, signed = self.workdir / "MyApp.pkg", self.workdir / "MyApp-signed.pkg"
        build_component_package(app, unsigned, identifier="com.democorp.MyApp.pkg")
        # As in SignPath's example: the team id alone selects the installer certificate.
        self._run_tool("productsign", "--timestamp", "--sign", DEMO_TEAM_ID, str(unsigned), str(signed))
        self.say("Checking the package's signature (pkgutil --check-signature)")
        self._run_tool("pkgutil", "--check-signature", str(signed))

    def preflight(self, app: Path, image: Path, package: Path) -> None:
        """What Apple's notary service would reject, checked offline; the demo root stands in for
        Apple's as the Developer ID anchor (SIGNBRIDGE_ANCHORS)."""
        self.say("Pre-flight for notarization: the app and the package, every piece of code inside, offline")
        self._run_tool("notarytool", "preflight", str(app), str(package))
        self.say("Pre-flight of the disk image: its FAT32 file system cannot hold the framework's symbolic links, "
                 "so the app inside it no longer verifies; the pre-flight finds that before any upload")
        self._run_tool("notarytool", "preflight", str(image), expect=(0, 1))

    def stop_token(self) -> None:
        _checked(_signbridge("stop", TOKEN_NAME, env=self.provider_env()), "signbridge stop")
        self.detail(f"token {TOKEN_NAME} stopped; its socket and p11-kit registration are gone")

    def _policy_certificate(self, slug: str) -> x509.Certificate:
        assert self.info is not None and self.service is not None
        with ServiceClient(self.service.api_url, self.info["organizationId"], self.info["apiToken"]) as client:
            (policy,) = client.my_signing_policies("demo", slug)
        return policy.certificate

    # The end

    def verify_audit_log(self) -> None:
        out = _checked(_signbridge("admin", "--data-dir", str(self.data_dir), "audit", "verify"), "audit verify")
        self.detail(out.strip())


def run_demo(echo: Echo, *, keep: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="signbridge-demo-") as temporary:
        demo = Demo(echo, keep or Path(temporary))
        demo.create_organization()
        demo.service = ServiceProcess(demo.data_dir)
        demo.say("Starting the signing service on a free loopback port")
        with demo.service:
            demo.detail(f"listening at {demo.service.api_url}")
            assert demo.info is not None
            with ServiceClient(demo.service.api_url, demo.info["organizationId"], demo.info["apiToken"],
                               service_unavailable_timeout=10) as client:
                demo.sign_through_the_api(client)
            record = demo.start_token()
            try:
                demo.sign_through_the_token(record)
                demo.sign_jar(record)
                app = demo.build_sample_app()
                demo.codesign_app(app)
                demo.codesign_disk_image(app)
                demo.productsign_app(app)
                demo.preflight(app, demo.workdir / "MyApp.dmg", demo.workdir / "MyApp-signed.pkg")
            finally:
                demo.stop_token()
            demo.say("Stopping the service (SIGTERM); every signature above is in the audit log")
        # uvicorn re-raises SIGTERM after its graceful shutdown, so -SIGTERM is a clean exit.
        if demo.service.process is not None and demo.service.process.returncode not in (0, -signal.SIGTERM, None):
            raise DemoError(f"the service exited with code {demo.service.process.returncode}")
        demo.verify_audit_log()
        echo("Done: keys stayed in the service; every signature was verified, audited and timestamped.")
