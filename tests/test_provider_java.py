"""Java's keytool and jarsigner through the token: SunPKCS11 with p11-kit's client module (the
token's socket in P11_KIT_SERVER_ADDRESS) and with p11-kit's proxy (the registration, a slot id).

The signed jar is checked twice: by ``jarsigner -verify -strict`` against a truststore holding the
demo root, and independently by openssl, which verifies the PKCS#7 signature block over the
signature file. JVM start-ups are few: two keytool listings, one signing, one import, one verify.
"""

from __future__ import annotations

import json
import re
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_file, require_tool, run
from providerkit import CLIENT_MODULE, PROXY_MODULE, Provider, audit_records, last_audit_seq
from servicekit import DemoService, demo_service
from signbridge import jarsigning

pytestmark = pytest.mark.timeout(300)


@dataclass
class JavaServed:
    """The demo service, and its token as SunPKCS11 sees it."""

    java: jarsigning.JavaToken
    service: DemoService


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JavaServed]:
    for tool in ("keytool", "jarsigner", "openssl", "pkcs11-tool"):
        require_tool(tool)
    require_file(CLIENT_MODULE, "p11-kit-modules")
    require_file(PROXY_MODULE, "p11-kit-modules")
    with demo_service(tmp_path_factory.mktemp("svc")) as service:
        provider = Provider.for_service(service)
        try:
            provider.start("--name", "sbjava")
            java = jarsigning.JavaToken.write(tmp_path_factory.mktemp("java"), "sbjava", provider.record().socket)
            yield JavaServed(java, service)
        finally:
            provider.cleanup()


def _entries(listing: str) -> dict[str, str]:
    return dict(re.findall(r"^(\S+), (\w+Entry),", listing, re.MULTILINE))


def test_keytool_lists_the_identities_through_the_client_module(served: JavaServed) -> None:
    out = jarsigning.run_java_tool(["keytool", "-list", *served.java.keystore_args()], env=served.java.env())
    assert "Keystore type: PKCS11" in out and "Keystore provider: SunPKCS11-sbjava" in out
    assert _entries(out) == {
        "demo/release-signing": "PrivateKeyEntry",
        "demo/installer-signing": "PrivateKeyEntry",
        "demo/ecdsa-signing": "PrivateKeyEntry",
    }


def test_keytool_finds_the_token_through_the_p11kit_proxy(served: JavaServed, tmp_path: Path) -> None:
    # The proxy numbers the slots of every registered module; pick ours by its label.
    slots = run(["pkcs11-tool", "--module", PROXY_MODULE, "-L"], text=True).stdout
    found = re.search(r"^Slot \d+ \((0x[0-9a-f]+)\):.*\n\s+token label\s+:\s+sbjava\s*$", slots, re.MULTILINE)
    assert found, slots
    config = tmp_path / "proxy.cfg"
    config.write_text(jarsigning.sunpkcs11_config("sbproxy", PROXY_MODULE, slot=int(found[1], 16)))
    args = ["-addprovider", "SunPKCS11", "-providerArg", str(config), "-storetype", "PKCS11", "-keystore", "NONE",
            "-storepass", "CONFIG"]
    out = jarsigning.run_java_tool(["keytool", "-list", *args])
    assert _entries(out)["demo/release-signing"] == "PrivateKeyEntry"


def test_jarsigner_signs_through_the_token_and_the_jar_verifies(served: JavaServed, tmp_path: Path) -> None:
    jar = jarsigning.write_sample_jar(tmp_path / "app.jar", {"com/example/App.txt": b"hello\n", "data/blob.bin": bytes(range(256))})
    original = jar.read_bytes()
    signed = tmp_path / "app-signed.jar"
    before = last_audit_seq(served.service)
    out = jarsigning.sign_jar(served.java, jar, signed, "demo/release-signing",
                              tsa_url=f"{served.service.api_url}/timestamp")
    assert "jar signed." in out
    assert jar.read_bytes() == original
    # One signature, one SignHash, made by jarsigner's JVM through the token.
    records = [r for r in audit_records(served.service, before) if r["outcome"] == "granted"]
    assert len(records) == 1 and records[0]["policy_slug"] == "release-signing"
    command_line = json.loads(records[0]["client_metadata"])["sourceProcess"]["commandLine"]
    assert "jarsigner" in command_line and "-storepass ***" in command_line and "CONFIG" not in command_line

    trust = jarsigning.truststore(tmp_path / "trust.p12", {"demo-root": served.service.root_pem})
    verified = jarsigning.verify_jar(signed, trust)
    assert 'Signed by "C=US, O=Demo Corp, OU=DEMOTEAM01, CN=Developer ID Application: Demo Corp (DEMOTEAM01)' in verified
    assert "Timestamped by" in verified and "jar verified." in verified

    # Independently: openssl checks the PKCS#7 block over the signature file and the certificate chain.
    with zipfile.ZipFile(signed) as archive:
        names = archive.namelist()
        (block,) = [n for n in names if n.startswith("META-INF/") and n.endswith(".RSA")]
        (signature_file,) = [n for n in names if n.startswith("META-INF/") and n.endswith(".SF")]
        (tmp_path / "block.p7").write_bytes(archive.read(block))
        (tmp_path / "file.sf").write_bytes(archive.read(signature_file))
    openssl = run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(tmp_path / "block.p7"),
                   "-content", str(tmp_path / "file.sf"), "-binary", "-CAfile", str(served.service.root_pem),
                   "-purpose", "any", "-out", "/dev/null"], text=True)  # fmt: skip
    assert "Verification successful" in openssl.stderr

    # A changed entry breaks it.
    tampered = tmp_path / "tampered.jar"
    with zipfile.ZipFile(signed) as source, zipfile.ZipFile(tampered, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            target.writestr(item, b"HELLO\n" if item.filename == "com/example/App.txt" else data)
    proc = subprocess.run([require_tool("jarsigner"), "-verify", "-strict", "-keystore", str(trust), "-storetype",
                           "PKCS12", "-storepass", "changeit", str(tampered)], capture_output=True, text=True)
    assert proc.returncode != 0 and "jar verified." not in proc.stdout
