"""Open the service's keystore from the ``keystore`` settings of its configuration file.

``{"backend": "software"}`` (the default when no backend is named) keeps keys in the data directory;
``{"backend": "pkcs11", "module": ..., "tokenLabel": ..., "pinEnv": ...}`` or ``..., "pinFile": ...``
keeps them on a PKCS#11 token. The PIN itself never appears in the settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from . import Keystore
from .pkcs11 import Pkcs11Keystore
from .software import MASTER_KEY_NAME, SoftwareKeystore

BACKENDS = ("software", "pkcs11")
_SOFTWARE_KEYS = frozenset({"backend"})
_PKCS11_KEYS = frozenset({"backend", "module", "tokenLabel", "pinEnv", "pinFile"})


@dataclass(frozen=True)
class SoftwareSettings:
    pass


@dataclass(frozen=True)
class Pkcs11Settings:
    module: str
    token_label: str
    pin_env: str | None
    pin_file: Path | None

    def pin_source(self) -> str:
        if self.pin_env is not None:
            return f"environment variable {self.pin_env}"
        return f"file {self.pin_file}"

    def read_pin(self) -> str:
        if self.pin_env is not None:
            pin = os.environ.get(self.pin_env)
            if pin is None:
                raise ConfigError(
                    f'the environment variable {self.pin_env} (keystore setting "pinEnv") is not set; '
                    f"it must hold the PIN of the PKCS#11 token {self.token_label!r}"
                )
            if not pin:
                raise ConfigError(
                    f'the environment variable {self.pin_env} (keystore setting "pinEnv") is empty'
                )
            return pin
        assert self.pin_file is not None
        where = f'{self.pin_file} (keystore setting "pinFile")'
        try:
            pin = self.pin_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"cannot read the PIN file {where}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"the PIN file {where} is not UTF-8 text") from None
        if not pin:
            raise ConfigError(f"the PIN file {where} is empty")
        return pin


def parse_keystore_settings(settings: Mapping[str, Any]) -> SoftwareSettings | Pkcs11Settings:
    """Check the keystore settings; every error names the setting at fault."""
    if not isinstance(settings, Mapping):
        raise ConfigError(f"the keystore settings must be an object, not {type(settings).__name__}")
    backend = settings.get("backend", "software")
    if backend not in BACKENDS:
        raise ConfigError(f'keystore setting "backend" must be one of {", ".join(BACKENDS)}, not {backend!r}')
    if "pin" in settings:
        raise ConfigError(
            'keystore setting "pin" is not allowed: never write the PIN into the configuration; '
            'name an environment variable ("pinEnv") or a file ("pinFile") that holds it'
        )
    allowed = _SOFTWARE_KEYS if backend == "software" else _PKCS11_KEYS
    unknown = sorted(str(key) for key in settings if key not in allowed)
    if unknown:
        raise ConfigError(
            f'unknown keystore setting "{unknown[0]}" for the {backend} backend; '
            f"it takes: {', '.join(sorted(allowed))}"
        )
    if backend == "software":
        return SoftwareSettings()
    pin_env = _optional_text(settings, "pinEnv")
    pin_file = _optional_text(settings, "pinFile")
    if (pin_env is None) == (pin_file is None):
        raise ConfigError('the pkcs11 keystore needs exactly one of the settings "pinEnv" and "pinFile"')
    return Pkcs11Settings(
        module=_required_text(settings, "module"),
        token_label=_required_text(settings, "tokenLabel"),
        pin_env=pin_env,
        pin_file=Path(pin_file).expanduser() if pin_file is not None else None,
    )


def open_keystore(data_dir: Path, settings: Mapping[str, Any]) -> Keystore:
    """The keystore the settings describe, opened and ready to sign."""
    parsed = parse_keystore_settings(settings)
    if isinstance(parsed, SoftwareSettings):
        return SoftwareKeystore(Path(data_dir))
    return Pkcs11Keystore(parsed.module, parsed.token_label, parsed.read_pin())


def describe_keystore(settings: Mapping[str, Any]) -> str:
    """One line for people: which keystore, and where its secret comes from (never the secret)."""
    parsed = parse_keystore_settings(settings)
    if isinstance(parsed, SoftwareSettings):
        return f"software keystore: keys encrypted at rest under {MASTER_KEY_NAME} in the data directory"
    return (
        f"PKCS#11 keystore: token {parsed.token_label!r} in module {parsed.module}, "
        f"PIN from the {parsed.pin_source()}"
    )


def _required_text(settings: Mapping[str, Any], key: str) -> str:
    value = _optional_text(settings, key)
    if value is None:
        raise ConfigError(f'the pkcs11 keystore needs the setting "{key}"')
    return value


def _optional_text(settings: Mapping[str, Any], key: str) -> str | None:
    value = settings.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f'keystore setting "{key}" must be a non-empty string')
    return value
