"""Where running tokens are recorded, and how to find them.

Each running token has a directory ``<runtime dir>/tokens/<name>/`` (0700) holding ``token.json``
(what it serves, its pid) and ``pkcs11.sock`` (the p11-kit RPC socket, 0600). The runtime dir is
``$XDG_RUNTIME_DIR/signbridge`` when that exists, else the user state directory. A record whose
process is gone, or whose socket no longer answers, is stale: it is ignored, and removed by
:func:`remove_stale`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs

RECORD = "token.json"
SOCKET = "pkcs11.sock"
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

    @property
    def directory(self) -> Path:
        return Path(self.socket).parent

    def to_json(self) -> dict:
        return asdict(self)


def write_record(record: TokenRecord) -> None:
    path = record.directory / RECORD
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(record.to_json(), handle, indent=2)
    os.replace(temporary, path)


def _read(directory: Path) -> TokenRecord | None:
    try:
        return TokenRecord(**json.loads((directory / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


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


def all_records() -> list[TokenRecord]:
    base = tokens_dir()
    if not base.is_dir():
        return []
    records = [_read(entry) for entry in sorted(base.iterdir()) if entry.is_dir()]
    return [record for record in records if record is not None]


def running_tokens() -> list[TokenRecord]:
    """Tokens whose process is alive and whose socket answers, by name."""
    return [record for record in all_records() if is_live(record)]


def remove_stale() -> list[TokenRecord]:
    """Delete the records (and module files) of tokens whose process is gone; returns them."""
    removed = []
    base = tokens_dir()
    if not base.is_dir():
        return removed
    for entry in sorted(base.iterdir()):
        if not entry.is_dir():
            continue
        record = _read(entry)
        if record is not None and is_live(record):
            continue
        if record is None and time.time() - entry.stat().st_mtime < _STARTING_GRACE_SECONDS:
            continue  # a token still starting has its directory before its record
        if record is not None and record.module_file:
            Path(record.module_file).unlink(missing_ok=True)
        shutil.rmtree(entry, ignore_errors=True)
        if record is not None:
            removed.append(record)
    return removed
