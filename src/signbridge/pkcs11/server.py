"""The p11-kit RPC server: a private Unix socket, one thread per connected consumer process.

The socket is created mode 0600 inside a directory only its owner can enter (0700), and only
peers with an allowed uid (by default the server's own) are served. A malformed frame closes that
connection alone; the server keeps serving everyone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from .calls import PROTOCOL_VERSION_MAX
from .dispatch import Connection
from .errors import ProtocolError, SocketPathError
from .peer import CallerInfo
from .token import Token
from .wire import FRAME_HEADER, encode_frame

log = logging.getLogger("signbridge.pkcs11")

MAX_FRAME = 16 * 1024 * 1024  # a request body; C_Sign with a SHA*-mechanism carries the data itself
MAX_OPTIONS = 4096  # p11-kit sends its module name here
FRAME_TIMEOUT = 30.0  # seconds to finish a frame once it has started
MAX_CONNECTIONS = 256


class Pkcs11Server:
    """Serves tokens (slot ids 1, 2, ... in the given order) on a Unix socket.

    Use as a context manager, or call :meth:`start` and :meth:`close`. :meth:`set_tokens` swaps
    the served tokens; sessions on a replaced token end.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        tokens: Token | Iterable[Token],
        *,
        allowed_uids: Iterable[int] | None = None,
        max_frame: int = MAX_FRAME,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = Path(path)
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids is not None else frozenset({os.geteuid()})
        self.max_frame = max_frame
        self.max_connections = max_connections
        self._slots: Mapping[int, Token] = {}
        self.set_tokens(tokens)
        self._listener: socket.socket | None = None
        self._wake_read, self._wake_write = -1, -1
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._closing = False

    # --- lifecycle --------------------------------------------------------------------------

    def set_tokens(self, tokens: Token | Iterable[Token]) -> None:
        listed = [tokens] if isinstance(tokens, Token) else list(tokens)
        self._slots = {slot: token for slot, token in enumerate(listed, start=1)}

    @property
    def tokens(self) -> Mapping[int, Token]:
        return self._slots

    def start(self) -> Pkcs11Server:
        self._listener = _bind(self.path)
        self._wake_read, self._wake_write = os.pipe()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="pkcs11-accept", daemon=True)
        self._accept_thread.start()
        log.info("serving %d token(s) on %s", len(self._slots), self.path)
        return self

    def serve_forever(self) -> None:
        """Block until :meth:`close` is called from another thread (or a signal handler)."""
        if self._accept_thread is None:
            self.start()
        assert self._accept_thread is not None
        self._accept_thread.join()

    def close(self) -> None:
        """Stop accepting, disconnect every client, wait for their threads, remove the socket."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            clients = list(self._clients.items())
        if self._wake_write >= 0:
            os.write(self._wake_write, b"x")
        if self._accept_thread is not None:
            self._accept_thread.join()
        for sock, _ in clients:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for _, thread in clients:
            thread.join(timeout=FRAME_TIMEOUT)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

    def __enter__(self) -> Pkcs11Server:
        if self._accept_thread is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._clients)

    # --- accepting --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_read in events:
                return
            try:
                sock, _ = self._listener.accept()
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        caller = CallerInfo.from_socket(sock)
        if caller.uid not in self.allowed_uids:
            log.warning("refused a connection from %s: uid not allowed", caller.describe())
            sock.close()
            return
        with self._lock:
            if self._closing or len(self._clients) >= self.max_connections:
                log.warning("refused a connection from %s: too many connections", caller.describe())
                sock.close()
                return
            thread = threading.Thread(
                target=self._serve_client, args=(sock, caller), name=f"pkcs11-{caller.pid}", daemon=True
            )
            self._clients[sock] = thread
        thread.start()

    # --- one client -------------------------------------------------------------------------

    def _serve_client(self, sock: socket.socket, caller: CallerInfo) -> None:
        connection: Connection | None = None
        try:
            offered = _recv_exact(sock, 1, first=True)
            if offered is None:
                return
            version = min(offered[0], PROTOCOL_VERSION_MAX)
            sock.sendall(bytes([version]))
            connection = Connection(lambda: self._slots, caller, version)
            while True:
                frame = self._read_frame(sock)
                if frame is None:
                    return
                call_code, body = frame
                sock.sendall(encode_frame(call_code, connection.handle(body)))
        except ProtocolError as exc:
            log.warning("closing the connection of %s: %s", caller.describe(), exc)
        except OSError as exc:
            if not self._closing:
                log.info("connection of %s ended: %s", caller.describe(), exc)
        finally:
            if connection is not None:
                connection.close()
            sock.close()
            with self._lock:
                self._clients.pop(sock, None)

    def _read_frame(self, sock: socket.socket) -> tuple[int, bytes] | None:
        header = _recv_exact(sock, FRAME_HEADER.size, first=True)
        if header is None:
            return None
        call_code, options_length, body_length = FRAME_HEADER.unpack(header)
        if call_code == 0:
            raise ProtocolError("frame with call code 0")
        if options_length > MAX_OPTIONS or body_length > self.max_frame:
            raise ProtocolError(f"frame too large ({options_length} + {body_length} bytes)")
        _recv_exact(sock, options_length)
        body = _recv_exact(sock, body_length)
        return call_code, body or b""


def _recv_exact(sock: socket.socket, size: int, *, first: bool = False) -> bytes | None:
    """``size`` bytes; None on a clean EOF before the first byte of a frame (when ``first``).

    Once a frame has begun, the rest must arrive within FRAME_TIMEOUT.
    """
    if first:
        sock.settimeout(None)  # a client may stay idle between frames for as long as it likes
    chunks = bytearray()
    while len(chunks) < size:
        try:
            chunk = sock.recv(min(size - len(chunks), 1 << 20))
        except TimeoutError:
            raise ProtocolError("the client stopped in the middle of a frame") from None
        if not chunk:
            if first and not chunks:
                return None
            raise ProtocolError("the client closed the connection in the middle of a frame")
        chunks += chunk
        sock.settimeout(FRAME_TIMEOUT)
    return bytes(chunks)


def _bind(path: Path) -> socket.socket:
    """A listening socket at ``path`` (mode 0600) in a directory private to this user (0700)."""
    directory = path.parent
    if not path.is_absolute():
        raise SocketPathError(f"the socket path {path} must be absolute (p11-kit needs unix:path=/...)")
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
    info = directory.stat()
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise SocketPathError(
            f"{directory} must belong to you and be closed to others (chmod 700) to hold the token socket"
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketPathError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a server that is gone
        else:
            raise SocketPathError(f"another server is already listening on {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(64)
    except OSError as exc:
        listener.close()
        raise SocketPathError(f"cannot listen on {path}: {exc.strerror}") from None
    return listener


def serve(
    path: str | os.PathLike[str],
    tokens: Token | Iterable[Token],
    *,
    allowed_uids: Iterable[int] | None = None,
    max_frame: int = MAX_FRAME,
    max_connections: int = MAX_CONNECTIONS,
) -> Pkcs11Server:
    """Start serving ``tokens`` on ``path`` in background threads; call ``.close()`` to stop."""
    return Pkcs11Server(
        path, tokens, allowed_uids=allowed_uids, max_frame=max_frame, max_connections=max_connections
    ).start()
