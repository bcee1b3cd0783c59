"""A throwaway PostgreSQL server on a loopback port, for tests (Debian's postgresql package)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from signbridge.server.process import free_port


def _bin(name: str) -> str:
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        pytest.fail(f"PostgreSQL's {name} is not installed; install the Debian package postgresql (`./dev test` does)")
    return candidates[-1]


def _as_server_user(args: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; Debian's package creates the postgres user.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a SQLAlchemy URL of a fresh database; the server is stopped and removed afterwards."""
    with postgres_instance() as instance:
        yield instance.url


class PostgresInstance:
    """A running test server that a test may stop and start again (same data, same port)."""

    def __init__(self, data: Path, sockets: Path, port: int) -> None:
        self.data, self.sockets, self.port = data, sockets, port
        self.url = f"postgresql://signbridge@127.0.0.1:{port}/signbridge"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            _as_server_user([_bin("postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                             "-k", str(self.sockets), "-c", "fsync=off"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while subprocess.run([_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail("the PostgreSQL test server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        # runuser may return before the server has released its data directory.
        deadline = time.monotonic() + 30
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


@contextmanager
def postgres_instance() -> Iterator[PostgresInstance]:
    """A fresh server with an empty database ``signbridge``; stopped and removed afterwards."""
    # Not under pytest's private temporary directory: the postgres user must be able to reach it.
    directory = Path(tempfile.mkdtemp(prefix="signbridge-pg-"))
    data, sockets = directory / "pgdata", directory / "pgsock"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
        shutil.chown(sockets, "postgres")
    subprocess.run(_as_server_user([_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "signbridge", "--no-sync"]),
                   check=True, capture_output=True)
    instance = PostgresInstance(data, sockets, free_port())
    try:
        instance.start()
        subprocess.run([_bin("createdb"), "-h", "127.0.0.1", "-p", str(instance.port), "-U", "signbridge", "signbridge"],
                       check=True, capture_output=True)
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)
