"""What signbridge knows of p11-kit: where it reads module files, its address syntax, its listing.

Where module files are read (p11-kit's conf.c and pkcs11.conf(5)): the system directories
``/etc/pkcs11/modules`` and ``/usr/share/p11-kit/modules``, and the user's module directory,
``$XDG_CONFIG_HOME/pkcs11/modules`` (``~/.config/pkcs11/modules``), unless the program runs as
root or setuid, ``P11_KIT_NO_USER_CONFIG`` is set, or a ``pkcs11.conf`` says
``user-config: none``. Module files and ``pkcs11.conf`` are both ``key: value`` lines with ``#``
comments. The provider writes its registrations with this (:mod:`signbridge.provider.registration`),
and the keychain checks them (:func:`signbridge.keychain.tokens.p11kit_registration`).
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

CONFIG_DIR = Path("/etc/pkcs11")
SYSTEM_CONFIG = CONFIG_DIR / "pkcs11.conf"
SYSTEM_MODULE_DIR = CONFIG_DIR / "modules"
SYSTEM_MODULE_DIRS = (SYSTEM_MODULE_DIR, Path("/usr/share/p11-kit/modules"))
_REMOTE_PREFIX = "unix:path="


def user_config_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``~/.config/pkcs11`` (``$XDG_CONFIG_HOME/pkcs11``): the user's ``pkcs11.conf`` and ``modules``."""
    config_home = environ.get("XDG_CONFIG_HOME")
    if config_home:
        return Path(config_home) / "pkcs11"
    return Path(environ.get("HOME") or Path.home()) / ".config" / "pkcs11"


def user_module_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """``~/.config/pkcs11/modules``, which p11-kit skips for root."""
    return user_config_dir(environ) / "modules"


def user_config_ignored(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why p11-kit would not read a (non-root) user's module directory, or None when it does."""
    if environ.get("P11_KIT_NO_USER_CONFIG"):
        return "P11_KIT_NO_USER_CONFIG is set"
    if _config_value(SYSTEM_CONFIG, "user-config") == "none":
        return f"{SYSTEM_CONFIG} says user-config: none"
    user_config = user_config_dir(environ) / "pkcs11.conf"
    if _config_value(user_config, "user-config") == "none":
        return f"{user_config} says user-config: none"
    return None


def read_fields(path: Path) -> dict[str, str]:
    """The ``key: value`` fields of a module file or ``pkcs11.conf`` (the last of a key wins)."""
    fields: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        name, colon, value = line.partition(":")
        if colon and not line.lstrip().startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _config_value(path: Path, key: str) -> str | None:
    try:
        return read_fields(path).get(key)
    except OSError:
        return None


def remote_address(socket_path: str | os.PathLike[str]) -> str:
    """``unix:path=/...``: what ``remote:`` and ``P11_KIT_SERVER_ADDRESS`` take (percent-encoded)."""
    return _REMOTE_PREFIX + quote(os.fspath(socket_path), safe="/-_.~+")


def socket_of(fields: Mapping[str, str]) -> str | None:
    """The socket a module file's ``remote:`` names, if it is a Unix socket."""
    remote = fields.get("remote", "")
    return unquote(remote[len(_REMOTE_PREFIX):]) if remote.startswith(_REMOTE_PREFIX) else None


def client_module_path() -> str | None:
    """Where ``p11-kit-client.so`` is installed (Debian: package p11-kit-modules), if it is."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    for candidate in (
        f"/usr/lib/{multiarch}/pkcs11/p11-kit-client.so",
        "/usr/lib64/pkcs11/p11-kit-client.so",
        "/usr/lib/pkcs11/p11-kit-client.so",
    ):
        if os.path.exists(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class P11KitListing:
    """What ``p11-kit list-modules`` shows: module names with the labels of their tokens."""

    modules: dict[str, list[str]]
    problem: str | None = None  # why p11-kit could not list its modules


def list_p11kit_modules() -> P11KitListing:
    """Run ``p11-kit list-modules`` and parse what it shows."""
    try:
        process = subprocess.run(
            ["p11-kit", "list-modules"], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        return P11KitListing({}, "p11-kit is not installed")
    except subprocess.TimeoutExpired:
        return P11KitListing({}, "p11-kit list-modules did not finish within 60 seconds")
    modules = p11kit_modules(process.stdout)
    if process.returncode != 0 and not modules:
        if CONFIG_DIR.is_dir() and not os.access(CONFIG_DIR, os.R_OK | os.X_OK):
            problem = f"p11-kit cannot read {CONFIG_DIR} (permission denied) and loads no module"
            return P11KitListing({}, problem)
        lines = process.stderr.strip().splitlines()
        return P11KitListing({}, lines[-1] if lines else f"p11-kit list-modules exited {process.returncode}")
    return P11KitListing(modules)


def p11kit_modules(listing: str) -> dict[str, list[str]]:
    """Module names and the labels of their tokens, from ``p11-kit list-modules`` output."""
    modules: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if line and not line[0].isspace() and ":" in line:
            current = modules.setdefault(line.split(":", 1)[0].strip(), [])
        elif current is not None and line.startswith("    token:"):
            current.append(line.split(":", 1)[1].strip())
    return modules
