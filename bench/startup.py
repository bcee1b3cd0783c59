"""Start-up time of short commands, next to importing cryptography's x509 in the same run.

    ./dev bench startup [--runs 11]

A small universal dylib (clang + ld64.lld + llvm-lipo, as in ``bench/codesign.py``) is signed
with an RSA-2048 identity under a local CA, then each command runs ``--runs`` times as a fresh
process, the commands taking turns so that the machine's load falls on all of them alike:

- the reference: ``python -c "import cryptography.x509"`` (and ``python -c pass`` beside it);
- ``signbridge --help``, ``signbridge codesign -dvvv`` and ``signbridge codesign --verify -v`` of
  the dylib (the local CA as the trust anchor), ``signbridge security find-identity -v``.

Printed per command: wall-clock median, best and worst, median / the reference's median, and the
median of the per-round ratios (each command against the reference of the same round, which is
steadier on a shared machine); then the CPU time (user + system) median and its ratio. Target:
``codesign -dvvv`` at most 2x the reference.
"""

# ruff: noqa: E402 - the path must be fixed before the other imports (see below)
from __future__ import annotations

import os
import sys

# Scripts in bench/ are named like standard modules: keep their directory off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from types import ModuleType

from cryptography.hazmat.primitives.serialization import Encoding

from signbridge.apple import codesign as cs
from signbridge.apple.codesig.options import CodesignOptions

ROOT = Path(__file__).resolve().parent.parent


def bench_module(name: str) -> ModuleType:
    """Another script of bench/ (its folder is not on the path), for its input builders."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(_HERE) / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_once(command: list[str], environment: dict[str, str], expected: int) -> tuple[float, float]:
    """Wall-clock and CPU (user + system) seconds of one run of ``command``."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    assert process.stderr is not None
    errors = process.stderr.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != expected:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}, not {expected}:\n{errors.decode()}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11, help="runs per command (medians are shown)")
    arguments = parser.parse_args()
    codesign_bench = bench_module("codesign")
    identity = codesign_bench.local_identity()
    python = sys.executable
    script = Path(python).parent / "signbridge"  # the console script, as users run it
    signbridge = [python, str(script)] if script.is_file() else [python, "-m", "signbridge"]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as temporary:
        work = Path(temporary)
        dylib = codesign_bench.build_dylib(work)
        cs.sign_code(dylib, identity, CodesignOptions(force=True))
        anchor = work / "anchor.pem"
        anchor.write_bytes(b"".join(certificate.public_bytes(Encoding.PEM) for certificate in identity.chain))
        # With bytecode caches, as an installed signbridge runs (pip compiles them on install): the
        # first run of each command writes any that are missing.
        environment = {
            **{key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"},
            "PYTHONPATH": str(ROOT / "src"),
            "SIGNBRIDGE_ANCHORS": str(anchor),
            "SIGNBRIDGE_RUNTIME_DIR": str(work / "run"),  # no token runs here
        }
        size = dylib.stat().st_size // 1024
        commands: list[tuple[str, list[str], int]] = [
            ('python -c "import cryptography.x509" (reference)', [python, "-c", "import cryptography.x509"], 0),
            ("python -c pass", [python, "-c", "pass"], 0),
            ("signbridge --help", [*signbridge, "--help"], 0),
            (f"signbridge codesign -dvvv ({size} KiB dylib)", [*signbridge, "codesign", "-dvvv", str(dylib)], 0),
            ("signbridge codesign --verify -v", [*signbridge, "codesign", "--verify", "-v", str(dylib)], 0),
            ("signbridge security find-identity -v", [*signbridge, "security", "find-identity", "-v"], 0),
        ]
        for _label, command, expected in commands:  # warm the page cache, write the bytecode caches
            run_once(command, environment, expected)
        walls: list[list[float]] = [[] for _ in commands]
        cpus: list[list[float]] = [[] for _ in commands]
        for _ in range(arguments.runs):
            for index, (_label, command, expected) in enumerate(commands):
                wall, cpu = run_once(command, environment, expected)
                walls[index].append(wall)
                cpus[index].append(cpu)
    reference_wall = statistics.median(walls[0])
    reference_cpu = statistics.median(cpus[0])
    load = os.getloadavg()[0]
    print(f"Fresh processes, {arguments.runs} runs each, taking turns; {os.cpu_count()} cores, load {load:.1f}")
    header = (
        f"{'command':<48}  {'median':>7}  {'best':>6}  {'worst':>6}  {'ratio':>5}  {'paired':>6}  "
        f"{'cpu':>6}  {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for index, (label, _command, _expected) in enumerate(commands):
        wall, cpu = walls[index], cpus[index]
        paired = statistics.median(value / base for value, base in zip(wall, walls[0], strict=True))
        print(
            f"{label:<48}  {statistics.median(wall):>6.3f}s  {min(wall):>5.3f}s  {max(wall):>5.3f}s  "
            f"{statistics.median(wall) / reference_wall:>4.2f}x  {paired:>5.2f}x  "
            f"{statistics.median(cpu):>5.3f}s  {statistics.median(cpu) / reference_cpu:>4.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
