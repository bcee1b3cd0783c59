"""Real PKCS#11 consumers against a token started with ``signbridge start``.

Two routes to the token: the p11-kit registration (consumers load p11-kit-proxy.so, or their
default module, and are given no module path) and ``P11_KIT_SERVER_ADDRESS`` with
``p11-kit-client.so``. Every signature is verified with openssl against the policy's certificate,
and every sign is exactly one SignHash in the service's audit log, carrying the caller's metadata.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from asn1crypto import cms as asn1_cms

from conftest import require_file, require_tool, run
from providerkit import (
    CLIENT_MODULE,
    ENGINE,
    PROXY_MODULE,
    Provider,
    audit_records,
    key_id_hex,
    last_audit_seq,
    policy_certificates,
)
from servicekit import DemoService, demo_service
from signbridge.provider import registry

pytestmark = pytest.mark.timeout(300)


@dataclass
class Served:
    service: DemoService
    provider: Provider
    record: registry.TokenRecord
    files: Path

    def pem(self, policy: str) -> str:
        return str(self.files / f"{policy}.pem")

    def pub(self, policy: str) -> str:
        return str(self.files / f"{policy}.pub.pem")

    def chain(self, policy: str) -> str:
        return str(self.files / f"{policy}.chain.pem")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    for tool in ("pkcs11-tool", "openssl", "osslsigncode", "p11tool", "p11-kit", "clang", "lld-link"):
        require_tool(tool)
    for path, package in ((PROXY_MODULE, "p11-kit-modules"), (CLIENT_MODULE, "p11-kit-modules"),
                          (ENGINE, "libengine-pkcs11-openssl")):
        require_file(path, package)
    with demo_service(tmp_path_factory.mktemp("svc")) as service:
        # A self-signed RSA code-signing key: osslsigncode verifies its chain end to end, with the
        # signer itself as the trust anchor.
        service.admin("cert", "generate", "authenticode", "--subject", "CN=Demo Authenticode,O=Demo Corp",
                      "--key-type", "rsa-2048")
        service.admin("policy", "create", "--project", "demo", "--certificate", "authenticode", "authenticode-signing")
        service.admin("submitter", "add", "--project", "demo", "--policy", "authenticode-signing", "--user", "demo-ci")
        files = tmp_path_factory.mktemp("certs")
        policy_certificates(service, files)
        provider = Provider.for_service(service)
        try:
            provider.start()
            yield Served(service, provider, provider.record(), files)
        finally:
            provider.cleanup()


ROUTES = ("proxy", "client")


def tool_env(served: Served, route: str) -> dict[str, str]:
    """Proxy: nothing but the registration. Client: the server address and the client module."""
    if route == "proxy":
        return served.provider.consumer_env()
    return served.provider.consumer_env(served.record, PKCS11_MODULE_PATH=CLIENT_MODULE)


def module_for(route: str) -> str:
    return PROXY_MODULE if route == "proxy" else CLIENT_MODULE


def pkcs11_tool(served: Served, route: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["pkcs11-tool", "--module", module_for(route), "--token-label", served.record.name, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, env=tool_env(served, route), timeout=120, check=False)
    if check:
        assert proc.returncode == 0, f"{' '.join(argv)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def key_uri(served: Served, policy: str, kind: str = "private") -> str:
    return f"pkcs11:token={served.record.name};object=demo%2F{policy};type={kind};pin-value=CONFIG"


@contextmanager
def exactly_one_sign(served: Served, policy: str, tool: str, *, user: str | None = None) -> Iterator[None]:
    """The block makes exactly one SignHash, for ``policy``, whose metadata names the calling tool."""
    since = last_audit_seq(served.service)
    yield
    records = audit_records(served.service, since)
    assert len(records) == 1, [(r["policy_slug"], r["outcome"]) for r in records]
    record = records[0]
    assert record["project_slug"] == "demo" and record["policy_slug"] == policy
    assert record["outcome"] == "granted" and record["status"] == 200
    assert record["user_name"] == (user or "demo-ci")
    metadata = json.loads(record["client_metadata"])
    process = metadata["sourceProcess"]
    assert Path(process["commandLine"].split()[0]).name == tool, process
    assert process["user"] == getpass.getuser()
    assert isinstance(process["pid"], int) and process["pid"] > 1
    assert metadata["cryptoProvider"]["token"] == served.record.name
    assert "pin-value=CONFIG" not in process["commandLine"]


def openssl_verify_digest(pub: str, digest_file: Path, signature_file: Path, *options: str) -> None:
    args = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-in", str(digest_file),
            "-sigfile", str(signature_file)]  # fmt: skip
    for option in options:
        args += ["-pkeyopt", option]
    assert "Signature Verified Successfully" in run(args).stdout.decode()


def write_inputs(directory: Path) -> tuple[Path, Path, Path]:
    data = directory / "data.bin"
    data.write_bytes(b"signed through the token\n" * 100)
    digest = directory / "data.sha256"
    digest.write_bytes(hashlib.sha256(data.read_bytes()).digest())
    digest_info = directory / "data.digestinfo"
    digest_info.write_bytes(bytes.fromhex("3031300d060960864801650304020105000420") + digest.read_bytes())
    return data, digest, digest_info


# --- pkcs11-tool ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_pkcs11_tool_lists_slots_objects_and_mechanisms(served: Served, route: str) -> None:
    slots = pkcs11_tool(served, route, "--list-token-slots").stdout
    assert f"token label        : {served.record.name}" in slots
    assert "login required" in slots and "readonly" in slots

    public = pkcs11_tool(served, route, "--list-objects").stdout
    assert "Private Key Object" not in public  # private keys only after login
    objects = pkcs11_tool(served, route, "--login", "--pin", "CONFIG", "--list-objects").stdout
    for policy in ("release-signing", "installer-signing", "ecdsa-signing", "authenticode-signing"):
        assert f"label:      demo/{policy}" in objects
        assert f"ID:         {key_id_hex('demo/' + policy)}" in objects
    assert objects.count("Private Key Object") == 4
    assert objects.count("Public Key Object") == 4
    assert "label:      Demo Corp Root CA" in objects
    assert "label:      Demo Corp Developer ID Certification Authority" in objects

    # Debian 12's p11-kit client hides the mechanisms it cannot carry (SHA*-RSA-PKCS-PSS, ECDSA-SHA*).
    mechanisms = pkcs11_tool(served, route, "--list-mechanisms").stdout
    for mechanism in ("RSA-PKCS,", "RSA-PKCS-PSS", "SHA256-RSA-PKCS,", "SHA512-RSA-PKCS,", "ECDSA,"):
        assert mechanism in mechanisms, mechanism


SIGN_CASES = {
    "rsa-pkcs": ("release-signing", ["-m", "RSA-PKCS"], "digestinfo", ["digest:sha256"]),
    "rsa-pss": ("release-signing", ["-m", "RSA-PKCS-PSS", "--hash-algorithm", "SHA256"], "digest",
                ["digest:sha256", "rsa_padding_mode:pss", "rsa_pss_saltlen:32"]),
    "sha256-rsa-pkcs": ("installer-signing", ["-m", "SHA256-RSA-PKCS"], "data", None),
    "ecdsa": ("ecdsa-signing", ["-m", "ECDSA", "--signature-format", "openssl"], "digest", ["digest:sha256"]),
}  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", sorted(SIGN_CASES))
def test_pkcs11_tool_signs(served: Served, route: str, case: str, tmp_path: Path) -> None:
    policy, mechanism, given, options = SIGN_CASES[case]
    data, digest, digest_info = write_inputs(tmp_path)
    source = {"data": data, "digest": digest, "digestinfo": digest_info}[given]
    signature = tmp_path / "sig.bin"
    with exactly_one_sign(served, policy, "pkcs11-tool"):
        pkcs11_tool(served, route, "--login", "--pin", "CONFIG", "--sign", *mechanism,
                    "--id", key_id_hex(f"demo/{policy}"), "-i", str(source), "-o", str(signature))  # fmt: skip
    if options is None:
        proc = run(["openssl", "dgst", "-sha256", "-verify", served.pub(policy), "-signature", str(signature), str(data)])
        assert proc.stdout.decode().strip() == "Verified OK"
    else:
        openssl_verify_digest(served.pub(policy), digest, signature, *options)


def test_a_signature_from_another_key_fails_the_check(served: Served, tmp_path: Path) -> None:
    _, digest, digest_info = write_inputs(tmp_path)
    signature = tmp_path / "sig.bin"
    pkcs11_tool(served, "client", "--login", "--pin", "CONFIG", "--sign", "-m", "RSA-PKCS",
                "--id", key_id_hex("demo/release-signing"), "-i", str(digest_info), "-o", str(signature))  # fmt: skip
    proc = subprocess.run(
        ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", served.pub("installer-signing"), "-in", str(digest),
         "-sigfile", str(signature), "-pkeyopt", "digest:sha256"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "Signature Verification Failure" in proc.stdout


def test_the_token_is_read_only(served: Served) -> None:
    proc = pkcs11_tool(served, "client", "--login", "--pin", "CONFIG", "--write-object", served.pem("release-signing"),
                       "--type", "cert", "--label", "intruder", check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "CKR_TOKEN_WRITE_PROTECTED" in proc.stderr or "CKR_SESSION_READ_ONLY" in proc.stderr
    listing = pkcs11_tool(served, "client", "--list-objects").stdout
    assert "intruder" not in listing


# --- login PINs -----------------------------------------------------------------------------------


def test_pin_with_organization_and_token_signs_as_that_user(served: Served, tmp_path: Path) -> None:
    service = served.service
    service.admin("user", "create", "second-ci")
    service.admin("submitter", "add", "--project", "demo", "--policy", "release-signing", "--user", "second-ci")
    token = json.loads(service.admin("token", "create", "second-ci", "--json").stdout)["apiToken"]
    _, digest, digest_info = write_inputs(tmp_path)
    signature = tmp_path / "sig.bin"
    with exactly_one_sign(served, "release-signing", "pkcs11-tool", user="second-ci"):
        pkcs11_tool(served, "client", "--login", "--pin", f"{service.org}:{token}", "--sign", "-m", "RSA-PKCS",
                    "--id", key_id_hex("demo/release-signing"), "-i", str(digest_info), "-o", str(signature))  # fmt: skip
    openssl_verify_digest(served.pub("release-signing"), digest, signature, "digest:sha256")
    # The provider's own token in PIN form is the same as CONFIG.
    with exactly_one_sign(served, "release-signing", "pkcs11-tool"):
        pkcs11_tool(served, "proxy", "--login", "--pin", f"{service.org}:{service.token}", "--sign", "-m", "RSA-PKCS",
                    "--id", key_id_hex("demo/release-signing"), "-i", str(digest_info), "-o", str(signature))  # fmt: skip
    log = served.provider.log_file.read_text()
    assert token not in log and service.token not in log


@pytest.mark.parametrize(
    "pin",
    ["wrong", "00000000-0000-4000-8000-000000000000:{token}", "{org}:not-a-token", "{org}:", "config"],
)
def test_other_pins_are_incorrect(served: Served, pin: str, tmp_path: Path) -> None:
    since = last_audit_seq(served.service)
    value = pin.format(org=served.service.org, token=served.service.token)
    proc = pkcs11_tool(served, "client", "--login", "--pin", value, "--list-objects", check=False)
    assert proc.returncode != 0
    assert "CKR_PIN_INCORRECT" in proc.stderr
    assert audit_records(served.service, since) == []
    assert served.service.token not in served.provider.log_file.read_text()


# --- openssl with the libp11 engine -------------------------------------------------------------


def openssl(served: Served, route: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run(["openssl", *args], env=tool_env(served, route))


@pytest.mark.parametrize("route", ROUTES)
def test_openssl_engine_pkeyutl_and_dgst(served: Served, route: str, tmp_path: Path) -> None:
    data, digest, _ = write_inputs(tmp_path)
    signature = tmp_path / "pkeyutl.sig"
    engine = ["-engine", "pkcs11", "-keyform", "engine"]
    with exactly_one_sign(served, "release-signing", "openssl"):
        openssl(served, route, "pkeyutl", *engine, "-sign", "-inkey", key_uri(served, "release-signing"),
                "-in", str(digest), "-pkeyopt", "digest:sha256", "-out", str(signature))  # fmt: skip
    openssl_verify_digest(served.pub("release-signing"), digest, signature, "digest:sha256")

    with exactly_one_sign(served, "release-signing", "openssl"):
        openssl(served, route, "pkeyutl", *engine, "-sign", "-inkey", key_uri(served, "release-signing"),
                "-in", str(digest), "-pkeyopt", "digest:sha256", "-pkeyopt", "rsa_padding_mode:pss",
                "-pkeyopt", "rsa_pss_saltlen:-1", "-out", str(signature))  # fmt: skip
    openssl_verify_digest(served.pub("release-signing"), digest, signature, "digest:sha256",
                          "rsa_padding_mode:pss", "rsa_pss_saltlen:-1")  # fmt: skip

    for policy in ("installer-signing", "ecdsa-signing"):
        dgst_signature = tmp_path / f"{policy}.sig"
        with exactly_one_sign(served, policy, "openssl"):
            openssl(served, route, "dgst", *engine, "-sign", key_uri(served, policy), "-sha256",
                    "-out", str(dgst_signature), str(data))  # fmt: skip
        proc = run(["openssl", "dgst", "-sha256", "-verify", served.pub(policy), "-signature", str(dgst_signature),
                    str(data)])  # fmt: skip
        assert proc.stdout.decode().strip() == "Verified OK"


@pytest.mark.parametrize("route", ROUTES)
def test_openssl_engine_cms_sign_verifies_against_the_demo_root(served: Served, route: str, tmp_path: Path) -> None:
    data, _, _ = write_inputs(tmp_path)
    signed = tmp_path / "data.p7s"
    with exactly_one_sign(served, "release-signing", "openssl"):
        openssl(served, route, "cms", "-sign", "-engine", "pkcs11", "-keyform", "engine",
                "-inkey", key_uri(served, "release-signing"), "-signer", served.pem("release-signing"),
                "-certfile", served.chain("release-signing"), "-in", str(data), "-binary",
                "-outform", "DER", "-out", str(signed))  # fmt: skip
    # The demo leaf's Apple marker extensions are not critical (real Developer ID ones are, and need
    # -ignore_critical), so openssl checks the whole chain as it is.
    proc = run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(signed), "-content", str(data), "-binary",
                "-CAfile", str(served.service.root_pem), "-purpose", "any", "-out", str(tmp_path / "out")])  # fmt: skip
    assert "Verification successful" in proc.stderr.decode()
    assert (tmp_path / "out").read_bytes() == data.read_bytes()


@pytest.mark.parametrize("route", ROUTES)
def test_openssl_engine_req_new_x509(served: Served, route: str, tmp_path: Path) -> None:
    certificate = tmp_path / "self.pem"
    with exactly_one_sign(served, "ecdsa-signing", "openssl"):
        openssl(served, route, "req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine",
                "-key", key_uri(served, "ecdsa-signing"), "-subj", "/CN=made through the token", "-days", "1",
                "-out", str(certificate))  # fmt: skip
    assert run(["openssl", "verify", "-CAfile", str(certificate), str(certificate)]).stdout.decode().strip().endswith("OK")
    made = run(["openssl", "x509", "-in", str(certificate), "-noout", "-pubkey"]).stdout
    assert made == Path(served.pub("ecdsa-signing")).read_bytes()


# --- osslsigncode ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) Windows x64 executable, compiled and linked by clang and lld-link."""
    directory = tmp_path_factory.mktemp("pe")
    (directory / "main.c").write_text("int start(void) { return 42; }\n")
    run(["clang", "--target=x86_64-pc-windows-msvc", "-c", str(directory / "main.c"), "-o", str(directory / "main.obj")])
    run(["lld-link", "/entry:start", "/subsystem:console", "/nodefaultlib", f"/out:{directory / 'app.exe'}",
         str(directory / "main.obj")])  # fmt: skip
    assert (directory / "app.exe").read_bytes()[:2] == b"MZ"
    return directory / "app.exe"


def check_authenticode_with_openssl(signed: Path, pub: str, tmp_path: Path) -> None:
    """Independently of osslsigncode: parse the PKCS#7 with asn1crypto, check the signature with openssl."""
    signature = tmp_path / "extracted.p7"
    run(["osslsigncode", "extract-signature", "-in", str(signed), "-out", str(signature)])
    content = asn1_cms.ContentInfo.load(signature.read_bytes())
    signed_data = content["content"]
    signer = signed_data["signer_infos"][0]
    attributes = signer["signed_attrs"]
    indirect = signed_data["encap_content_info"]["content"].parsed
    inner = indirect.contents  # Authenticode digests the content octets of SpcIndirectDataContent
    message_digest = next(a["values"][0].native for a in attributes if a["type"].native == "message_digest")
    assert message_digest == hashlib.sha256(inner).digest()
    (tmp_path / "attrs.der").write_bytes(attributes.untag().dump())
    (tmp_path / "attrs.sig").write_bytes(signer["signature"].native)
    proc = run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", str(tmp_path / "attrs.sig"),
                str(tmp_path / "attrs.der")])  # fmt: skip
    assert proc.stdout.decode().strip() == "Verified OK"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("policy", "anchor"), [("authenticode-signing", "self"), ("ecdsa-signing", "root")])
def test_osslsigncode_signs_a_pe_file(
    served: Served, route: str, policy: str, anchor: str, pe_file: Path, tmp_path: Path
) -> None:
    signed = tmp_path / "app-signed.exe"
    module = [] if route == "proxy" else ["-pkcs11module", CLIENT_MODULE]
    chain = ["-ac", served.chain(policy)] if Path(served.chain(policy)).stat().st_size else []
    with exactly_one_sign(served, policy, "osslsigncode"):
        run(["osslsigncode", "sign", *module, "-pkcs11engine", ENGINE, "-key", key_uri(served, policy),
             "-certs", served.pem(policy), *chain, "-h", "sha256",
             "-in", str(pe_file), "-out", str(signed)], env=tool_env(served, route))  # fmt: skip
    ca = served.pem(policy) if anchor == "self" else str(served.service.root_pem)
    proc = run(["osslsigncode", "verify", "-CAfile", ca, "-in", str(signed)])
    output = proc.stdout.decode()
    assert "Signature verification: ok" in output and output.rstrip().endswith("Succeeded")
    check_authenticode_with_openssl(signed, served.pub(policy), tmp_path)


# --- p11tool and python-pkcs11 -----------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_p11tool_lists_everything(served: Served, route: str) -> None:
    provider = [] if route == "proxy" else ["--provider", CLIENT_MODULE]
    proc = run(["p11tool", *provider, "--login", "--set-pin", "CONFIG", "--list-all",
                f"pkcs11:token={served.record.name}"], env=tool_env(served, route))  # fmt: skip
    listing = proc.stdout.decode()
    for policy in ("release-signing", "ecdsa-signing"):
        assert f"object=demo%2F{policy};type=private" in listing
        assert f"object=demo%2F{policy};type=cert" in listing
    assert "Type: Private key (RSA-2048)" in listing and "Type: Private key (EC/ECDSA-SECP256R1)" in listing
    assert "Label: Demo Corp Root CA\n\tFlags: CKA_CERTIFICATE_CATEGORY=CA" in listing  # authority objects


PYTHON_PKCS11 = textwrap.dedent("""
    import sys
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    module, token_label, out = sys.argv[1:4]
    token = pkcs11.lib(module).get_token(token_label=token_label)
    with token.open(user_pin="CONFIG") as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="demo/release-signing")
        open(out, "wb").write(key.sign(b"python-pkcs11 was here", mechanism=Mechanism.SHA256_RSA_PKCS))
        certificates = list(session.get_objects({pkcs11.Attribute.CLASS: ObjectClass.CERTIFICATE}))
        print("\\n".join(sorted(c[pkcs11.Attribute.LABEL] for c in certificates)))
""")


@pytest.mark.parametrize("route", ROUTES)
def test_python_pkcs11(served: Served, route: str, tmp_path: Path) -> None:
    signature = tmp_path / "sig.bin"
    (tmp_path / "data").write_bytes(b"python-pkcs11 was here")
    with exactly_one_sign(served, "release-signing", Path(sys.executable).name):
        proc = run([sys.executable, "-c", PYTHON_PKCS11, module_for(route), served.record.name, str(signature)],
                   env=tool_env(served, route))  # fmt: skip
    assert "demo/release-signing" in proc.stdout.decode().splitlines()
    verify = run(["openssl", "dgst", "-sha256", "-verify", served.pub("release-signing"),
                  "-signature", str(signature), str(tmp_path / "data")])  # fmt: skip
    assert verify.stdout.decode().strip() == "Verified OK"
