"""Where running tokens are recorded, and how to find them.

Each running token has a directory ``<runtime dir>/tokens/<name>/`` (0700) holding ``token.json``
(what it serves, its pid), ``pkcs11.sock`` (the p11-kit RPC socket, 0600) and ``lock`` (held
with ``flock`` by the token process for as long as it lives, from before it loads certificates).
The runtime dir is ``$SIGNBRIDGE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/signbridge`` when that
exists, else ``run`` in the user state directory.

A record whose process is gone, or whose socket no longer answers, is stale: it is ignored, and
removed (with its p11-kit module file) by :func:`remove_stale`. A directory whose lock is held
belongs to a token that is still starting and is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs

from ..atomic import write_atomically
from ..p11kit import remote_address

RECORD = "token.json"
SOCKET = "pkcs11.sock"
LOCK = "lock"
_STARTING_GRACE_SECONDS = 60


def runtime_dir() -> Path:
    override = os.environ.get("SIGNBRIDGE_RUNTIME_DIR")
    if override:
        return Path(override)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "signbridge"
    return Path(platformdirs.user_state_dir("signbridge")) / "run"


def tokens_dir() -> Path:
    return runtime_dir() / "tokens"


def token_directory(name: str) -> Path:
    return tokens_dir() / name


@dataclass(frozen=True)
class TokenRecord:
    name: str  # the token's label, also its directory name
    pid: int
    socket: str
    api_url: str
    organization_id: str
    project_slug: str | None
    signing_policy_slug: str | None
    version: str
    started: str  # ISO 8601
    module_file: str | None  # the p11-kit module file that registers it, if any
    identities: int
    key_ids: tuple[str, ...] = ()  # "$ProjectSlug/$SigningPolicySlug" of each identity
    loaded: str = ""  # ISO 8601: when the certificates were last loaded
    generation: int = 0  # how many times they were reloaded (signbridge restart)
    last_error: str | None = None  # why the last reload failed, if it did
    log_file: str | None = None

    @property
    def directory(self) -> Path:
        return Path(self.socket).parent

    @property
    def server_address(self) -> str:
        """The value for ``P11_KIT_SERVER_ADDRESS`` (p11-kit-client.so)."""
        return remote_address(self.socket)

    def to_json(self) -> dict:
        data = asdict(self)
        data["key_ids"] = list(self.key_ids)
        return data

    @classmethod
    def from_json(cls, data: dict) -> TokenRecord:
        """A record from :meth:`to_json` output; fields it does not know are ignored."""
        known = {key: value for key, value in data.items() if key in _FIELDS}
        if "key_ids" in known:
            known["key_ids"] = tuple(known["key_ids"])
        return cls(**known)


_FIELDS = {item.name for item in dataclasses.fields(TokenRecord)}


def write_record(record: TokenRecord) -> None:
    path = record.directory / RECORD
    write_atomically(path, json.dumps(record.to_json(), indent=2).encode(), mode=0o600)


def read_record(directory: Path) -> TokenRecord | None:
    try:
        return TokenRecord.from_json(json.loads((directory / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


_read = read_record


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def is_live(record: TokenRecord) -> bool:
    return pid_alive(record.pid) and socket_answers(record.socket)


def lock_is_held(directory: Path) -> bool:
    """Whether a token process holds ``directory``'s lock (it is starting or running)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock taken here
    return False


class TokenLock:
    """The lock a token process holds on its directory for as long as it lives."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock; False when another live process has it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.set_inheritable(fd, False)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def all_records() -> list[TokenRecord]:
    base = tokens_dir()
    if not base.is_dir():
        return []
    records = [read_record(entry) for entry in sorted(base.iterdir()) if entry.is_dir()]
    return [record for record in records if record is not None]


def running_tokens() -> list[TokenRecord]:
    """Tokens whose process is alive and whose socket answers, by name."""
    return [record for record in all_records() if is_live(record)]


def stale_tokens() -> list[TokenRecord]:
    """Records of tokens that are gone (killed, crashed) but not cleaned up yet."""
    return [
        record for record in all_records() if not is_live(record) and not lock_is_held(record.directory)
    ]


def find(name: str) -> TokenRecord | None:
    record = read_record(token_directory(name))
    return record if record is not None and record.name == name else None


def remove_stale() -> list[TokenRecord]:
    """Delete the records (and module files) of tokens whose process is gone; returns them."""
    removed: list[TokenRecord] = []
    base = tokens_dir()
    if not base.is_dir():
        return removed
    for entry in sorted(base.iterdir()):
        if not entry.is_dir() or lock_is_held(entry):
            continue
        record = read_record(entry)
        if record is not None and is_live(record):
            continue
        if record is None and time.time() - entry.stat().st_mtime < _STARTING_GRACE_SECONDS:
            continue  # a token still starting has its directory before its record
        if record is not None and record.module_file:
            with contextlib.suppress(FileNotFoundError):
                Path(record.module_file).unlink()
        shutil.rmtree(entry, ignore_errors=True)
        if record is not None:
            removed.append(record)
    return removed
