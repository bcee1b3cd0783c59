"""Who is on the other end of a Unix socket: SO_PEERCRED plus what /proc tells about the process."""

from __future__ import annotations

import pwd
import re
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

# Options whose next argument is a secret (pkcs11-tool, p11tool, openssl, osslsigncode; jarsigner,
# keytool; gpg, whose --passphrase is the card PIN with --pinentry-mode loopback).
_SECRET_OPTIONS = {
    "--pin", "-p", "--so-pin", "--puk", "--new-pin", "--set-pin", "-pass", "-passin", "-passout",
    "-storepass", "-keypass", "-srcstorepass", "-deststorepass", "--passphrase",
}  # fmt: skip
_SECRET_INLINE = re.compile(r"(pin-value=|--(?:so-)?pin=|--set-pin=|--passphrase=|pass:)[^;&?\s]*", re.IGNORECASE)


@dataclass(frozen=True)
class CallerInfo:
    """The process that connected. ``command_line`` and ``user`` are empty/None when unreadable."""

    pid: int | None
    uid: int | None
    gid: int | None
    command_line: tuple[str, ...] = ()
    user: str | None = None

    @classmethod
    def from_socket(cls, sock: socket.socket) -> CallerInfo:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            return cls(None, None, None)
        pid, uid, gid = _UCRED.unpack(raw)
        return cls(pid, uid, gid, _command_line(pid), _user_name(uid))

    @property
    def redacted_command_line(self) -> tuple[str, ...]:
        """The command line with PINs and passwords replaced by ``***``: what may be logged or sent."""
        redacted = []
        hide_next = False
        for argument in self.command_line:
            if hide_next:
                redacted.append("***")
                hide_next = False
                continue
            hide_next = argument in _SECRET_OPTIONS
            redacted.append(_SECRET_INLINE.sub(lambda match: match.group(1) + "***", argument))
        return tuple(redacted)

    def describe(self) -> str:
        """One line for logs: ``pid 4242 uid 1000 (alice): openssl dgst -sign ...`` (secrets hidden)."""
        who = f"pid {self.pid} uid {self.uid}"
        if self.user:
            who += f" ({self.user})"
        if self.command_line:
            who += ": " + " ".join(self.redacted_command_line)
        return who


def _command_line(pid: int) -> tuple[str, ...]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read(16384)
    except OSError:
        return ()
    return tuple(part.decode("utf-8", errors="replace") for part in raw.split(b"\0") if part)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
