"""Publishing a running token to p11-kit: a module config file whose ``remote:`` is the token's socket.

With the file in place, ``p11-kit list-modules`` shows the token, and every consumer that loads
``p11-kit-proxy.so`` (OpenSSL's pkcs11 engine and pkcs11-provider by default, GnuTLS's p11tool,
``pkcs11-tool --module p11-kit-proxy.so``) reaches it with no module path.

Where the file goes: the user's module directory (see :mod:`signbridge.p11kit` for when p11-kit
reads it). For root no setting turns user config back on, so as root the file goes to the system
directory ``/etc/pkcs11/modules``. ``SIGNBRIDGE_P11KIT_MODULE_DIR`` overrides both.

Files are named ``signbridge-<token>.module`` and carry ``x-signbridge-token:`` (p11-kit ignores
``x-`` fields), so a file left behind by a killed token is recognised and removed once its
socket no longer answers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from .. import p11kit
from ..atomic import write_atomically
from ..errors import SignbridgeError
from .naming import PREFIX
from .registry import pid_alive, socket_answers

MARKER = "x-signbridge-token"
PID_FIELD = "x-signbridge-pid"


class RegistrationError(SignbridgeError):
    """The module file could not be written."""


def module_dir(environ: Mapping[str, str] = os.environ, uid: int | None = None) -> Path:
    """The p11-kit module directory that this user's programs read (see the module docstring)."""
    override = environ.get("SIGNBRIDGE_P11KIT_MODULE_DIR")
    if override:
        return Path(override)
    if (os.getuid() if uid is None else uid) == 0:
        return p11kit.SYSTEM_MODULE_DIR
    return p11kit.user_module_dir(environ)


def user_config_ignored(environ: Mapping[str, str] = os.environ, uid: int | None = None) -> str | None:
    """Why p11-kit would not read the user's module directory, or None when it does (or is not used)."""
    if "SIGNBRIDGE_P11KIT_MODULE_DIR" in environ or (os.getuid() if uid is None else uid) == 0:
        return None
    return p11kit.user_config_ignored(environ)


def module_file_name(token_name: str) -> str:
    stem = token_name if token_name.startswith(PREFIX) else PREFIX + token_name
    return f"{stem}.module"


def register(token_name: str, socket_path: str | os.PathLike[str], pid: int, directory: Path | None = None) -> Path:
    """Write the module file (atomically: p11-kit never reads half of it); returns its path."""
    directory = directory or module_dir()
    path = directory / module_file_name(token_name)
    text = (
        f"# The signbridge token {token_name} (process {pid}). `signbridge stop` removes this file;\n"
        "# `signbridge start` removes it if the token died. See pkcs11.conf(5).\n"
        f"remote: {p11kit.remote_address(socket_path)}\n"
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


def our_module_files(directory: Path | None = None) -> list[Path]:
    directory = directory or module_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob(f"{PREFIX}*.module")):
        try:
            if MARKER in p11kit.read_fields(path):
                found.append(path)
        except OSError:
            continue
    return found


def module_is_stale(path: Path) -> bool:
    """A module file of ours whose token is gone: its process is dead or its socket is silent."""
    try:
        fields = p11kit.read_fields(path)
    except FileNotFoundError:
        return False
    socket_path = p11kit.socket_of(fields)
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
