"""Publishing a running token to p11-kit: a module config file whose ``remote:`` is the token's socket.

With the file in place, ``p11-kit list-modules`` shows the token, and every consumer that loads
``p11-kit-proxy.so`` (OpenSSL's pkcs11 engine and pkcs11-provider by default, GnuTLS's p11tool,
``pkcs11-tool --module p11-kit-proxy.so``) reaches it with no module path.

Where the file goes (p11-kit's conf.c and pkcs11.conf(5)): p11-kit reads the user's module
directory, ``$XDG_CONFIG_HOME/pkcs11/modules`` (``~/.config/pkcs11/modules``), unless the program
runs as root or setuid, ``P11_KIT_NO_USER_CONFIG`` is set, or a ``pkcs11.conf`` says
``user-config: none``. For root no setting turns user config back on, so as root the file goes
to the system directory ``/etc/pkcs11/modules``. ``SIGNBRIDGE_P11KIT_MODULE_DIR`` overrides both.

Files are named ``signbridge-<token>.module`` and carry ``x-signbridge-token:`` (p11-kit ignores
``x-`` fields), so a file left behind by a killed token is recognised and removed once its
socket no longer answers.
"""

from __future__ import annotations

import contextlib
import os
import sysconfig
from pathlib import Path
from urllib.parse import quote, unquote

from ..atomic import write_atomically
from ..errors import SignbridgeError
from .naming import PREFIX
from .registry import pid_alive, socket_answers

SYSTEM_MODULE_DIR = Path("/etc/pkcs11/modules")
SYSTEM_CONFIG = Path("/etc/pkcs11/pkcs11.conf")
MARKER = "x-signbridge-token"
PID_FIELD = "x-signbridge-pid"
_REMOTE_PREFIX = "unix:path="


class RegistrationError(SignbridgeError):
    """The module file could not be written."""


def module_dir(environ: os._Environ[str] | dict[str, str] = os.environ, uid: int | None = None) -> Path:
    """The p11-kit module directory that this user's programs read (see the module docstring)."""
    override = environ.get("SIGNBRIDGE_P11KIT_MODULE_DIR")
    if override:
        return Path(override)
    if (os.getuid() if uid is None else uid) == 0:
        return SYSTEM_MODULE_DIR
    return user_config_dir(environ) / "modules"


def user_config_dir(environ: os._Environ[str] | dict[str, str] = os.environ) -> Path:
    config_home = environ.get("XDG_CONFIG_HOME")
    if config_home:
        return Path(config_home) / "pkcs11"
    return Path(environ.get("HOME") or Path.home()) / ".config" / "pkcs11"


def user_config_ignored(
    environ: os._Environ[str] | dict[str, str] = os.environ, uid: int | None = None
) -> str | None:
    """Why p11-kit would not read the user's module directory, or None when it does (or is not used)."""
    if "SIGNBRIDGE_P11KIT_MODULE_DIR" in environ or (os.getuid() if uid is None else uid) == 0:
        return None
    if environ.get("P11_KIT_NO_USER_CONFIG"):
        return "P11_KIT_NO_USER_CONFIG is set"
    if _config_value(SYSTEM_CONFIG, "user-config") == "none":
        return f"{SYSTEM_CONFIG} says user-config: none"
    user_config = user_config_dir(environ) / "pkcs11.conf"
    if _config_value(user_config, "user-config") == "none":
        return f"{user_config} says user-config: none"
    return None


def _config_value(path: Path, key: str) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    value = None
    for line in lines:
        name, colon, rest = line.partition(":")
        if colon and not line.lstrip().startswith("#") and name.strip() == key:
            value = rest.strip()
    return value


def module_file_name(token_name: str) -> str:
    stem = token_name if token_name.startswith(PREFIX) else PREFIX + token_name
    return f"{stem}.module"


def remote_address(socket_path: str | os.PathLike[str]) -> str:
    """``unix:path=/...``: what ``remote:`` and ``P11_KIT_SERVER_ADDRESS`` take (percent-encoded)."""
    return _REMOTE_PREFIX + quote(os.fspath(socket_path), safe="/-_.~+")


def register(token_name: str, socket_path: str | os.PathLike[str], pid: int, directory: Path | None = None) -> Path:
    """Write the module file (atomically: p11-kit never reads half of it); returns its path."""
    directory = directory or module_dir()
    path = directory / module_file_name(token_name)
    text = (
        f"# The signbridge token {token_name} (process {pid}). `signbridge stop` removes this file;\n"
        "# `signbridge start` removes it if the token died. See pkcs11.conf(5).\n"
        f"remote: {remote_address(socket_path)}\n"
        "critical: no\n"
        f"{MARKER}: {token_name}\n"
        f"{PID_FIELD}: {pid}\n"
    )
    try:
        _make_directories(directory)
        # The temporary file lives beside the directory: p11-kit loads every file inside it. The
        # file is readable by everyone, whatever the umask: p11-kit stops loading every module, for
        # every program of a user, when one file in a system module directory cannot be read.
        write_atomically(path, text.encode(), mode=0o644, directory=directory.parent)
    except OSError as exc:
        raise RegistrationError(
            f"cannot register the token with p11-kit: cannot write {path}: {exc.strerror or exc}"
        ) from None
    return path


def _make_directories(directory: Path) -> None:
    """Create ``directory`` and missing parents as 0755: p11-kit fails when it cannot list a system one."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
        path.chmod(0o755)


def unregister(path: str | os.PathLike[str] | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


def read_module(path: Path) -> dict[str, str]:
    """The ``key: value`` fields of a module file."""
    fields: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        name, colon, value = line.partition(":")
        if colon and not line.lstrip().startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def socket_of(fields: dict[str, str]) -> str | None:
    remote = fields.get("remote", "")
    return unquote(remote[len(_REMOTE_PREFIX):]) if remote.startswith(_REMOTE_PREFIX) else None


def our_module_files(directory: Path | None = None) -> list[Path]:
    directory = directory or module_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob(f"{PREFIX}*.module")):
        try:
            if MARKER in read_module(path):
                found.append(path)
        except OSError:
            continue
    return found


def module_is_stale(path: Path) -> bool:
    """A module file of ours whose token is gone: its process is dead or its socket is silent."""
    try:
        fields = read_module(path)
    except FileNotFoundError:
        return False
    socket_path = socket_of(fields)
    pid = fields.get(PID_FIELD, "")
    if pid.isdigit() and not pid_alive(int(pid)):
        return True
    return socket_path is None or not socket_answers(socket_path)


def remove_orphans(directory: Path | None = None) -> list[Path]:
    """Remove module files of ours whose token is gone (killed with -9, crashed); returns them."""
    removed = []
    for path in our_module_files(directory):
        if module_is_stale(path):
            unregister(path)
            removed.append(path)
    return removed


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
