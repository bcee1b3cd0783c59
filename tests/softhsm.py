"""Throwaway SoftHSM2 tokens for tests, in a temporary directory (never the system token directory).

``create_softhsm_token(tmp_path)`` writes a softhsm2.conf whose token directory lies inside
``tmp_path``, initialises a token there, and returns everything a test needs: the module path, the
token label, the PIN and a 0600 file holding it, and the environment (``SOFTHSM2_CONF``) for any
process that should see the token::

    token = create_softhsm_token(tmp_path)
    subprocess.run([...], env={**os.environ, **token.env})      # another process
    settings = token.keystore_settings()                         # {"backend": "pkcs11", ...}

SoftHSM2 reads its configuration, and the list of tokens, when the module is initialised, and
python-pkcs11 initialises a module once per process. To use a token *inside* the test process,
wrap the work in ``softhsm_in_this_process(token)``: it points ``SOFTHSM2_CONF`` at the token and
re-initialises SoftHSM2 on entry and exit. Create every token you need (``token.add_token(...)``)
before entering, and close every keystore opened on it before leaving.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11

from conftest import require_file, require_tool, run

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


@dataclass(frozen=True)
class SoftHsmToken:
    module: str
    label: str
    pin: str
    so_pin: str
    pin_file: Path
    conf_file: Path
    token_dir: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that make SoftHSM2 use this token's directory."""
        return {"SOFTHSM2_CONF": str(self.conf_file)}

    def keystore_settings(self, pin_env: str | None = None) -> dict[str, Any]:
        """Keystore settings for this token: the PIN from ``pin_file``, or from ``pin_env`` if named."""
        settings: dict[str, Any] = {"backend": "pkcs11", "module": self.module, "tokenLabel": self.label}
        if pin_env is None:
            settings["pinFile"] = str(self.pin_file)
        else:
            settings["pinEnv"] = pin_env
        return settings

    def add_token(self, label: str, pin: str | None = None) -> SoftHsmToken:
        """Initialise another token in the same token directory (same ``env``)."""
        return _init_token(self.conf_file, self.token_dir, label, pin)


def create_softhsm_token(directory: Path, label: str = "signbridge", pin: str | None = None) -> SoftHsmToken:
    """A fresh SoftHSM2 token whose configuration and objects all live under ``directory``."""
    require_file(SOFTHSM_MODULE, "softhsm2")
    directory = Path(directory)
    token_dir = directory / "softhsm-tokens"
    token_dir.mkdir(parents=True, mode=0o700)
    conf_file = directory / "softhsm2.conf"
    conf_file.write_text(
        f"directories.tokendir = {token_dir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    return _init_token(conf_file, token_dir, label, pin)


@contextmanager
def softhsm_in_this_process(token: SoftHsmToken) -> Iterator[SoftHsmToken]:
    """Make python-pkcs11 in this process see ``token``'s directory, then put things back."""
    previous = os.environ.get("SOFTHSM2_CONF")
    _unload_softhsm()
    os.environ["SOFTHSM2_CONF"] = str(token.conf_file)
    try:
        yield token
    finally:
        _unload_softhsm()
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


def _init_token(conf_file: Path, token_dir: Path, label: str, pin: str | None) -> SoftHsmToken:
    pin = pin or secrets.token_hex(8)
    so_pin = secrets.token_hex(8)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf_file)}
    run(
        [require_tool("softhsm2-util"), "--init-token", "--free", "--label", label,
         "--so-pin", so_pin, "--pin", pin],
        env=env,
    )
    pin_file = token_dir.parent / f"{label}.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(pin + "\n")
    return SoftHsmToken(SOFTHSM_MODULE, label, pin, so_pin, pin_file, conf_file, token_dir)


def _unload_softhsm() -> None:
    # python-pkcs11 caches a module per path string; finalising it makes the next use re-read
    # SOFTHSM2_CONF and the token directory.
    for path in {SOFTHSM_MODULE, os.path.realpath(SOFTHSM_MODULE)}:
        pkcs11.unload(path)
