"""Java's jarsigner and keytool through a running token (SunPKCS11 over p11-kit).

SunPKCS11 loads one PKCS#11 module from a small configuration file: here p11-kit's client module,
which reaches the token named by ``P11_KIT_SERVER_ADDRESS``. The token's identities are then
keystore entries of type PKCS11, aliased by their ``CKA_LABEL`` (``project/policy``), and the
keystore password is the token's PIN (``CONFIG``). jarsigner hashes the signature file itself and
hands the token one ``C_Sign`` per jar: only that digest goes to the signing service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path, write_atomically
from .errors import SignatureError, SignbridgeError
from .p11kit import client_module_path

TOKEN_PIN = "CONFIG"


class JavaToolError(SignbridgeError):
    """keytool or jarsigner is missing, or refused what it was asked."""


def sunpkcs11_config(name: str, library: str, *, slot_list_index: int | None = 0, slot: int | None = None) -> str:
    """A SunPKCS11 configuration: ``name`` becomes the provider ``SunPKCS11-<name>``; the token is
    chosen by its index among the module's slots with a token, or by its slot id."""
    lines = [f"name = {name}", f"library = {library}"]
    if slot is not None:
        lines.append(f"slot = {slot}")
    elif slot_list_index is not None:
        lines.append(f"slotListIndex = {slot_list_index}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class JavaToken:
    """A running token as SunPKCS11 sees it: the configuration file and the environment to use."""

    config: Path
    socket: str

    @classmethod
    def write(cls, directory: Path, name: str, socket: str) -> JavaToken:
        library = client_module_path()
        if library is None:
            raise JavaToolError("p11-kit-client.so is not installed (Debian package p11-kit-modules)")
        config = directory / f"{name}.pkcs11.cfg"
        write_atomically(config, sunpkcs11_config(name, library).encode(), mode=None)
        return cls(config, socket)

    def env(self) -> dict[str, str]:
        return {**os.environ, "P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}"}

    def keystore_args(self) -> list[str]:
        return ["-addprovider", "SunPKCS11", "-providerArg", str(self.config),
                "-storetype", "PKCS11", "-keystore", "NONE", "-storepass", TOKEN_PIN]  # fmt: skip


def java_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise JavaToolError(f"{name} is not installed; install a JDK (Debian package openjdk-17-jdk-headless)")
    return path


def run_java_tool(args: Sequence[str], *, env: dict[str, str] | None = None) -> str:
    """Run keytool or jarsigner; their output, or an error with what they said."""
    proc = subprocess.run([java_tool(args[0]), *args[1:]], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).strip().splitlines()
        raise JavaToolError(f"{args[0]} exited {proc.returncode}: {said[-1] if said else 'no output'}")
    return proc.stdout + proc.stderr


def write_sample_jar(path: Path, files: dict[str, bytes]) -> Path:
    """A jar (a zip with a manifest first) holding ``files``."""
    with atomic_path(path) as temporary, zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\r\nCreated-By: signbridge\r\n\r\n")
        for name, content in files.items():
            jar.writestr(name, content)
    return path


def sign_jar(token: JavaToken, jar: Path, signed: Path, alias: str, *, tsa_url: str | None = None) -> str:
    """``jarsigner`` with the token's key ``alias``; writes ``signed`` (never touches ``jar``)."""
    args = ["jarsigner", *token.keystore_args(), "-signedjar", str(signed)]
    if tsa_url:
        args += ["-tsa", tsa_url]
    return run_java_tool([*args, str(jar), alias], env=token.env())


def truststore(path: Path, anchors: dict[str, Path], password: str = "changeit") -> Path:
    """A PKCS12 truststore with ``anchors`` (alias -> PEM file) as trusted certificates."""
    with atomic_path(path) as temporary:
        for alias, pem in anchors.items():
            run_java_tool(["keytool", "-importcert", "-noprompt", "-alias", alias, "-file", str(pem),
                           "-keystore", str(temporary), "-storetype", "PKCS12", "-storepass", password])  # fmt: skip
    return path


def verify_jar(jar: Path, trust: Path, password: str = "changeit") -> str:
    """``jarsigner -verify -strict`` against ``trust``; raises SignatureError unless the jar verifies."""
    args = ["jarsigner", "-verify", "-strict", "-verbose:summary", "-certs",
            "-keystore", str(trust), "-storetype", "PKCS12", "-storepass", password, str(jar)]  # fmt: skip
    try:
        out = run_java_tool(args)
    except JavaToolError as exc:
        raise SignatureError(f"jarsigner -verify -strict rejected {jar.name}: {exc}") from None
    if "jar verified." not in out:
        raise SignatureError(f"jarsigner -verify did not verify {jar.name}")
    return out
