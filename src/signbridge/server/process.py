"""Running the service as a child process on a free loopback port (the demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .._httpx import httpx
from ..errors import SignbridgeError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``signbridge server run`` in a child process; ``api_url`` is valid once :meth:`start` returns."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        workers: int = 1,
        log_path: Path | None = None,
        extra_env: dict[str, str] | None = None,
        database_url: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.port = port or free_port()
        self.workers = workers
        self.log_path = log_path or data_dir / "service.log"
        self.extra_env = extra_env or {}
        self.database_url = database_url
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/Api"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        command = [
            sys.executable, "-m", "signbridge", "server", "run",
            "--data-dir", str(self.data_dir), "--port", str(self.port),
            "--workers", str(self.workers), "--no-access-log", "--log-level", "warning", *self.extra_args,
        ]
        if self.database_url:
            command += ["--database-url", self.database_url]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.extra_env}, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SignbridgeError(f"the signing service exited with code {self.process.returncode}; see {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise SignbridgeError(f"the signing service did not become ready within {timeout:g} s; see {self.log_path}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, and wait for the graceful shutdown; the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()
