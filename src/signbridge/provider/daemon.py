"""The token process: load the certificates, serve them, register with p11-kit, clean up at the end.

``signbridge start`` runs :func:`spawn`: a child process (``python -m signbridge.provider NAME``, in
its own session) receives the settings on its stdin, so the API token is never in its argv, its
environment or a file, and reports back on its stdout, one JSON event per line::

    {"event": "waiting", "reason": "..."}          the service is not answering yet; still trying
    {"event": "ready", "record": {...}, "notes": [...]}
    {"event": "failed", "message": "...", "exitCode": 1}

After "ready" the child points its standard streams at /dev/null and serves until SIGTERM or
SIGINT. SIGHUP reloads the certificates (``signbridge restart``). ``--foreground`` runs the same
:func:`run_token` in the command's own process.

Whatever ends the process, the socket, the module file and the record go with it: stop, SIGTERM
and errors remove them here; after kill -9 they are stale, ignored by the registry's readers and
removed by the next start (:func:`signbridge.provider.registry.remove_stale`, :func:`remove_orphans`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import SignbridgeError
from . import registration, registry
from .logs import configure_logging, log_file_path
from .settings import ProviderSettings

if TYPE_CHECKING:  # imported where the token process needs them: `signbridge start` itself does not
    from ..api.client import ServiceClient
    from ..pkcs11 import Pkcs11Server, Token
    from .loader import LoadedIdentities
    from .signer import ServiceSigner

log = logging.getLogger("signbridge.token")

Report = Callable[[dict[str, Any]], None]

SECRET_VARIABLES = ("SIGNPATH_API_TOKEN", "SIGNPATH_CI_USER_TOKEN")
MAX_SOCKET_PATH = 107  # sizeof(sun_path) - 1 on Linux
_PATH_FIELDS = ("log_file_directory", "ca_bundle", "config_file")


class AlreadyRunning(SignbridgeError):
    """A token of that name runs (or starts) in another process."""


class StopRequested(Exception):  # noqa: N818 - a signal, not an error
    """SIGTERM/SIGINT arrived while the main thread was busy loading."""


# --- settings across the pipe -------------------------------------------------------------------


def settings_to_wire(settings: ProviderSettings) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if isinstance(value, Path):
            value = str(value)
        elif item.name == "trust_anchors":
            value = [str(path) for path in value]
        elif item.name == "sources":
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        data[item.name] = value
    return data


def settings_from_wire(data: dict[str, Any]) -> ProviderSettings:
    values = dict(data)
    for name in _PATH_FIELDS:
        if values.get(name) is not None:
            values[name] = Path(values[name])
    values["trust_anchors"] = tuple(Path(path) for path in values.get("trust_anchors", ()))
    values["warnings"] = tuple(values.get("warnings", ()))
    return ProviderSettings(**values)


# --- the token in this process -----------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class TokenProcess:
    """One token served from this process: :meth:`start`, then :meth:`reload` as asked, :meth:`close`."""

    def __init__(self, settings: ProviderSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.directory = registry.token_directory(name)
        self.socket_path = self.directory / registry.SOCKET
        self.lock = registry.TokenLock(self.directory)
        self.client: ServiceClient | None = None
        self.signer: ServiceSigner | None = None
        self.server: Pkcs11Server | None = None
        self.module_file: Path | None = None
        self.record: registry.TokenRecord | None = None
        self.notes: list[str] = []
        self._owns_directory = False

    def start(self, on_retry: Callable[[str, float], None] | None = None) -> registry.TokenRecord:
        from ..pkcs11.server import serve
        from .loader import build_objects, fetch_policies
        from .signer import ServiceSigner, service_client

        self._prepare_directories()
        client = service_client(self.settings, on_retry=on_retry)
        self.client = client
        started = time.monotonic()
        policies = fetch_policies(client, self.settings.project_slug, self.settings.signing_policy_slug)
        fetched = time.monotonic()
        identities = build_objects(policies)
        built = time.monotonic()
        log.info(
            "loaded %d identities in %.3f s (fetching %.3f s, objects %.3f s): %s",
            len(identities.policies), built - started, fetched - started, built - fetched,
            ", ".join(identities.key_ids),
        )  # fmt: skip
        self.notes.extend(f"not served: {reason}" for reason in identities.skipped)
        self.signer = ServiceSigner(self.settings, client, self.name)
        if identities.policies:
            first = identities.policies[0]
            self.signer.probe = (first.project_slug, first.signing_policy_slug)
        self.server = serve(self.socket_path, self._token(identities))
        self.module_file = registration.register(self.name, self.socket_path, os.getpid())
        ignored = registration.user_config_ignored()
        if ignored:
            self.notes.append(
                f"p11-kit will not read {self.module_file} ({ignored}); use P11_KIT_SERVER_ADDRESS instead"
            )
        self.record = registry.TokenRecord(
            name=self.name,
            pid=os.getpid(),
            socket=str(self.socket_path),
            api_url=self.settings.api_url,
            organization_id=self.settings.organization_id or "",
            project_slug=self.settings.project_slug,
            signing_policy_slug=self.settings.signing_policy_slug,
            version=__version__,
            started=_now(),
            module_file=str(self.module_file),
            identities=len(identities.policies),
            key_ids=identities.key_ids,
            loaded=_now(),
            log_file=str(log_file_path(self.settings)) if log_file_path(self.settings) else None,
        )
        registry.write_record(self.record)
        log.info("token %s is ready on %s (p11-kit module %s)", self.name, self.socket_path, self.module_file)
        return self.record

    def _prepare_directories(self) -> None:
        for directory in (registry.runtime_dir(), registry.tokens_dir()):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for record in registry.remove_stale():
            log.info("removed the stale token %s (process %d is gone)", record.name, record.pid)
        for path in registration.remove_orphans():
            log.info("removed the stale p11-kit module file %s", path)
        if not self.lock.acquire():
            running = registry.find(self.name)
            pid = f" (process {running.pid})" if running else ""
            raise AlreadyRunning(f"a token named {self.name} is already running or starting{pid}")
        self._owns_directory = True
        for leftover in (self.directory / registry.RECORD, self.socket_path):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        length = len(os.fsencode(self.socket_path))
        if length > MAX_SOCKET_PATH:
            from .loader import LoadError

            raise LoadError(
                f"the socket path {self.socket_path} is {length} bytes, too long for a Unix socket "
                f"(at most {MAX_SOCKET_PATH}); set SIGNBRIDGE_RUNTIME_DIR to a shorter directory"
            )

    def _token(self, identities: LoadedIdentities) -> Token:
        from ..pkcs11.token import Token

        assert self.signer is not None
        return Token(
            label=self.name,
            objects=identities.objects,
            signer=self.signer,
            check_pin=self.signer.check_pin,
            model="SignBridge",
            slot_description=f"signbridge {self.settings.api_url}"[:64],
        )

    def reload(self) -> registry.TokenRecord:
        """Load the certificates again and swap the served token; on failure keep serving the old one."""
        from .loader import load_identities

        assert self.client is not None and self.server is not None and self.record is not None
        try:
            identities = load_identities(self.client, self.settings.project_slug, self.settings.signing_policy_slug)
        except SignbridgeError as exc:
            log.error("reloading the certificates failed; still serving the previous ones: %s", exc)
            self.record = dataclasses.replace(self.record, generation=self.record.generation + 1, last_error=str(exc))
        except Exception as exc:
            log.exception("reloading the certificates failed; still serving the previous ones")
            error = f"unexpected error: {exc!r}"
            self.record = dataclasses.replace(self.record, generation=self.record.generation + 1, last_error=error)
        else:
            self.server.set_tokens(self._token(identities))
            log.info("reloaded %d identities: %s", len(identities.policies), ", ".join(identities.key_ids))
            self.record = dataclasses.replace(
                self.record,
                identities=len(identities.policies),
                key_ids=identities.key_ids,
                loaded=_now(),
                generation=self.record.generation + 1,
                last_error=None,
            )
        if self.module_file is not None and not self.module_file.exists():
            self.module_file = registration.register(self.name, self.socket_path, os.getpid())
        registry.write_record(self.record)
        return self.record

    def close(self) -> None:
        """Unregister, stop serving, forget the record: the token is gone."""
        registration.unregister(self.module_file)
        self.module_file = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.signer is not None:
            self.signer.close()
        if self.client is not None:
            self.client.close()
        if self._owns_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._owns_directory = False
        self.lock.release()


# --- running it ---------------------------------------------------------------------------------


class _Signals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload) for the token's main thread.

    The kernel may deliver a signal to any of the process's threads, and Python runs its handler
    only when the main thread next runs Python code: a main thread asleep in a wait would sleep on.
    The C-level handler also writes the signal's number to a wake-up pipe, whichever thread took
    it, and :meth:`wait` sleeps on that pipe."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.busy = True  # while True, SIGTERM interrupts the main thread instead of setting ``stop``
        self._wake_read, self._wake_write = os.pipe()
        for descriptor in (self._wake_read, self._wake_write):
            os.set_blocking(descriptor, False)

    def install(self) -> None:
        signal.set_wakeup_fd(self._wake_write)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)

    def wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout`` seconds pass; note what the signals ask."""
        readable, _, _ = select.select([self._wake_read], [], [], timeout)
        if not readable:
            return
        with contextlib.suppress(BlockingIOError):
            for number in os.read(self._wake_read, 512):
                if number in (signal.SIGTERM, signal.SIGINT):
                    self.stop.set()
                elif number == signal.SIGHUP:
                    self.reload.set()

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stop.set()
        if self.busy:
            raise StopRequested(signal.Signals(signum).name)

    def _on_reload(self, _signum: int, _frame: object) -> None:
        self.reload.set()


def run_token(settings: ProviderSettings, name: str, report: Report, *, detach: bool) -> int:
    """Serve the token until a signal ends it; the exit code. ``report`` gets the events (see above)."""
    try:
        logger = configure_logging(settings)
    except SignbridgeError as exc:
        report({"event": "failed", "message": str(exc), "exitCode": exc.exit_code})
        return exc.exit_code
    for warning in settings.warnings:
        logger.warning("%s", warning)
    logger.info("starting token %s (signbridge %s, pid %d): %s", name, __version__, os.getpid(), settings.redacted())
    signals = _Signals()
    signals.install()
    process = TokenProcess(settings, name)

    def on_retry(reason: str, delay: float) -> None:
        log.warning("the signing service is not available (%s); trying again in %.1f s", reason, delay)
        report({"event": "waiting", "reason": reason, "delay": round(delay, 2)})

    try:
        try:
            record = process.start(on_retry)
        except StopRequested as exc:
            log.info("stopped by %s before the token was ready", exc)
            report({"event": "failed", "message": f"stopped by {exc} before the token was ready", "exitCode": 1})
            return 1
        except SignbridgeError as exc:
            log.error("the token cannot start: %s", exc)
            report({"event": "failed", "message": str(exc), "exitCode": exc.exit_code})
            return exc.exit_code
        except Exception as exc:
            log.exception("the token cannot start")
            report({"event": "failed", "message": f"unexpected error: {exc!r}", "exitCode": 1})
            return 1
        report({"event": "ready", "record": record.to_json(), "notes": process.notes})
        if detach:
            _detach_streams()
        _notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
        _serve_until_stopped(process, signals)
        log.info("token %s stopped", name)
        return 0
    except StopRequested as exc:
        log.info("token %s stopped by %s", name, exc)
        return 0
    finally:
        signals.busy = False
        process.close()


def _serve_until_stopped(process: TokenProcess, signals: _Signals) -> None:
    signals.busy = False
    while not signals.stop.is_set():
        signals.wait(timeout=5.0)
        if signals.reload.is_set() and not signals.stop.is_set():
            signals.reload.clear()
            signals.busy = True
            log.info("SIGHUP: reloading the certificates")
            process.reload()
            signals.busy = False


def _detach_streams() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _notify_systemd(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("could not notify systemd at %s: %s", address, exc)


# --- the parent side of `signbridge start` ------------------------------------------------------


@dataclass(frozen=True)
class Started:
    record: registry.TokenRecord
    notes: tuple[str, ...]


class StartFailed(SignbridgeError):
    """The token process said why it could not start (one line)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def spawn(settings: ProviderSettings, name: str, on_waiting: Callable[[str], None] | None = None) -> Started:
    """Start the token process and wait until it is ready (or says why it is not)."""
    environment = {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}
    child = subprocess.Popen(
        [sys.executable, "-m", "signbridge.provider", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=environment,
        start_new_session=True,
        close_fds=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(json.dumps(settings_to_wire(settings)).encode() + b"\n")
        child.stdin.close()
        for line in child.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("event") == "waiting" and on_waiting is not None:
                on_waiting(str(event.get("reason", "")))
            elif event.get("event") == "ready":
                return Started(registry.TokenRecord.from_json(event["record"]), tuple(event.get("notes", ())))
            elif event.get("event") == "failed":
                child.wait()
                raise StartFailed(str(event.get("message")), int(event.get("exitCode") or 1))
    except BaseException:
        if child.poll() is None:
            child.terminate()
            child.wait()
        raise
    code = child.wait()
    where = log_file_path(settings)
    hint = f"; see {where}" if where else ""
    raise StartFailed(f"the token process exited with code {code} before it was ready{hint}")


def child_main(argv: list[str]) -> int:
    """``python -m signbridge.provider NAME``: the settings arrive on stdin, events leave on stdout."""
    if len(argv) != 1:
        print("usage: python -m signbridge.provider NAME  (settings as JSON on stdin)", file=sys.stderr)
        return 2
    settings = settings_from_wire(json.loads(sys.stdin.readline()))
    os.chdir("/")
    os.umask(0o077)
    events = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything else printed goes where the logs go, never into the events
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)

    def report(event: dict[str, Any]) -> None:
        if events.closed:
            return
        try:
            events.write(json.dumps(event) + "\n")
            events.flush()
        except BrokenPipeError:
            log.info("signbridge start is no longer waiting for this token's events")
            with contextlib.suppress(OSError):
                events.close()
            return
        if event["event"] in ("ready", "failed"):
            events.close()

    return run_token(settings, argv[0], report, detach=True)


# --- stopping and reloading from another process -------------------------------------------------


def stop(record: registry.TokenRecord, timeout: float = 10.0) -> bool:
    """SIGTERM the token and wait for it to go; SIGKILL (and clean up) if it does not. True if it ended."""
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        registry.remove_stale()
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not registry.pid_alive(record.pid) or _is_zombie(record.pid):
            return True
        time.sleep(0.02)
    log.warning("token %s (process %d) did not stop within %g s; killing it", record.name, record.pid, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(record.pid, signal.SIGKILL)
    time.sleep(0.1)
    registration.unregister(record.module_file)
    shutil.rmtree(record.directory, ignore_errors=True)
    return not registry.pid_alive(record.pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def reload(record: registry.TokenRecord, timeout: float) -> registry.TokenRecord | None:
    """SIGHUP the token and wait until it has reloaded; its new record, or None on timeout."""
    os.kill(record.pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = registry.find(record.name)
        if current is None:
            return None
        if current.generation > record.generation:
            return current
        time.sleep(0.05)
    return None
