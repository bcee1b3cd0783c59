"""Metrics and readiness on an address of their own (``server run --metrics-address``).

The listener runs in ``server run``'s main process, beside uvicorn, so that it is not reachable
where the API is: it adds up every worker's metrics (see :mod:`.metrics`) and checks the database
and the keystore with connections of its own.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .._httpx import httpx
from ..errors import ConfigError
from . import metrics
from .datadir import DataDir
from .readiness import check_readiness

log = logging.getLogger("signbridge.server")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return None


class OperationsApp:
    """GET /Api/metrics, /Api/readyz and /Api/healthz (paths case-insensitive, as the API's)."""

    def __init__(self, open_store: Callable[[], DataDir], api_health_url: str) -> None:
        self._open_store = open_store
        self._api_health_url = api_health_url
        self._store: DataDir | None = None
        self._lock = threading.Lock()

    def store(self) -> DataDir:
        with self._lock:
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "").lower()
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n")
        if path == "/api/metrics":
            return _reply(start_response, "200 OK", metrics.CONTENT_TYPE, metrics.exposition())
        if path == "/api/healthz":
            return _reply(start_response, "200 OK", "text/plain; charset=utf-8", b"Healthy")
        if path == "/api/readyz":
            store = self.store()
            readiness = check_readiness(store.engine, store.keystore)
            readiness.checks["api"] = self._api_answers()
            status = "200 OK" if readiness.ready else "503 Service Unavailable"
            return _reply(start_response, status, "application/json", json.dumps(readiness.body()).encode())
        return _reply(start_response, "404 Not Found", "text/plain", b"There is no such route.\n")

    def _api_answers(self) -> str:
        """Whether the API's own address serves yet (the workers start after this listener). Only
        this machine's service is asked, so its certificate is not checked."""
        try:
            response = httpx.get(self._api_health_url, timeout=5.0, verify=False)
        except httpx.HTTPError as exc:
            return f"unavailable: {exc or type(exc).__name__}"
        return "ok" if response.status_code == 200 else f"unavailable: HTTP {response.status_code}"

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def _reply(start_response: StartResponse, status: str, content_type: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


class OperationsServer:
    """The listener in a daemon thread; :meth:`close` stops it."""

    def __init__(self, address: tuple[str, int], open_store: Callable[[], DataDir], api_health_url: str) -> None:
        self.app = OperationsApp(open_store, api_health_url)
        try:
            self._server = make_server(address[0], address[1], self.app, server_class=_ThreadingServer,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address[0]}:{address[1]} for metrics and readiness: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="signbridge-operations", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/Api"

    def start(self) -> OperationsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.app.close()
