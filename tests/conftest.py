"""Shared test helpers.

Third-party tools are real parts of these tests: a missing one is a failure, never a skip, so the
suite cannot pass on a machine that did not run it for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def require_tool(name: str) -> str:
    """The path of an installed program, or a test failure that names the Debian package to install."""
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if path is None:
        pytest.fail(f"{name} is not installed; `./dev test` installs every tool the suite needs")
    return path


def require_file(path: str, package: str) -> str:
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing; install the Debian package {package} (`./dev test` does)")
    return path


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a program, failing the test with its output when it exits non-zero."""
    kwargs.setdefault("capture_output", True)
    proc = subprocess.run(args, **kwargs)
    if proc.returncode != 0:
        out = proc.stdout.decode(errors="replace") if isinstance(proc.stdout, bytes) else proc.stdout
        err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else proc.stderr
        pytest.fail(f"{' '.join(map(str, args))} exited {proc.returncode}\n{out}\n{err}")
    return proc
