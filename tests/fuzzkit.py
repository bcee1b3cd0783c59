"""Mutation fuzzing with Hypothesis: seeds from the fixtures and the corpus, mutants of them, a time bound.

A harness names its seeds (bytes the tests build and real files from the corpus) and a target that
reads one input. The target may only succeed or raise ``SignbridgeError``; any other exception, or
more than ``FUZZ_TIME_BOUND`` seconds on one input, fails the harness with the input saved under
``.fuzz-failures/`` so it can become a regression test.

``SIGNBRIDGE_FUZZ_CASES`` sets the number of cases per harness (10,000 by default);
``./dev fuzz [CASES]`` runs every harness longer. Hypothesis keeps no example database: every run
starts from the seeds, so CI is reproducible from ``SIGNBRIDGE_FUZZ_SEED``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from conftest import ROOT
from signbridge.errors import SignbridgeError

FUZZ_CASES = int(os.environ.get("SIGNBRIDGE_FUZZ_CASES", "10000"))
FUZZ_SEED = int(os.environ.get("SIGNBRIDGE_FUZZ_SEED", "20261203"))
FUZZ_TIME_BOUND = float(os.environ.get("SIGNBRIDGE_FUZZ_TIME_BOUND", "2.0"))
FAILURES = ROOT / ".fuzz-failures"

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


class FuzzTimeout(Exception):
    """One input took longer than the harness's time bound."""


def _mutate(data: bytes, draw) -> bytes:
    buffer = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(("flip", "byte", "word", "delete", "insert", "truncate", "duplicate")))
        size = len(buffer)
        where = draw(st.integers(0, max(size - 1, 0)))
        if kind == "flip" and size:
            buffer[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte" and size:
            buffer[where] = draw(st.integers(0, 255))
        elif kind == "word" and size >= 4:
            where = min(where, size - 4)
            value = draw(st.sampled_from(_INTERESTING))
            buffer[where:where + 4] = struct.pack(draw(st.sampled_from((">I", "<I"))), value)
        elif kind == "delete" and size:
            del buffer[where:where + draw(st.integers(1, 64))]
        elif kind == "insert":
            buffer[where:where] = draw(st.binary(min_size=1, max_size=32))
        elif kind == "truncate":
            del buffer[where:]
        elif kind == "duplicate" and size:
            chunk = buffer[where:where + draw(st.integers(1, 256))]
            buffer[where:where] = chunk
    return bytes(buffer)


@st.composite
def mutants(draw, seeds: Sequence[bytes]) -> bytes:
    """One of ``seeds``, mutated a few times (or, rarely, unchanged or random bytes)."""
    choice = draw(st.integers(0, 99))
    if choice == 0:
        return draw(st.binary(max_size=512))
    original = draw(st.sampled_from(list(seeds)))
    return original if choice == 1 else _mutate(original, draw)


def _with_time_bound(target: Callable[[bytes], object], data: bytes) -> None:
    expired = False
    message = f"one input took more than {FUZZ_TIME_BOUND} s"

    def expire(signum, frame):
        nonlocal expired
        expired = True
        raise FuzzTimeout(message)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, FUZZ_TIME_BOUND)
    try:
        target(data)
    except FuzzTimeout:
        raise
    except BaseException:
        if expired:
            raise FuzzTimeout(message) from None
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # The alarm's exception is lost when it lands in a garbage-collector callback or a __del__.
    if expired:
        raise FuzzTimeout(message)


def fuzz(name: str, seeds: Sequence[bytes], target: Callable[[bytes], object], cases: int = FUZZ_CASES) -> int:
    """Runs ``target`` on ``cases`` mutants of ``seeds``; fails on the first traceback or slow input.

    Returns the number of inputs run, so the caller can assert the harness did its share.
    """
    if not seeds:
        raise AssertionError(f"fuzz harness {name} has no seeds")
    count = 0
    started = time.monotonic()

    @seed(FUZZ_SEED)
    @settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
    )
    @given(mutants(seeds))
    def run_one(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            _with_time_bound(target, data)
        except SignbridgeError:
            return
        except BaseException:
            FAILURES.mkdir(exist_ok=True)
            saved = FAILURES / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}"
            saved.write_bytes(data)
            raise

    run_one()
    elapsed = time.monotonic() - started
    print(f"fuzz {name}: {count} inputs in {elapsed:.1f} s")
    return count


def read_seeds(paths: Sequence[Path], limit: int = 4 << 20) -> list[bytes]:
    """The bytes of each seed file no larger than ``limit`` (fuzzing huge seeds wastes the budget)."""
    return [path.read_bytes() for path in paths if path.is_file() and path.stat().st_size <= limit]
