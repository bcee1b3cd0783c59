"""Mutation fuzzing with Hypothesis: seeds from the fixtures and the corpus, mutants of them, a time bound.

A harness names its seeds (bytes the tests build and real files from the corpus) and a target that
reads one input. The target may only succeed or raise ``SignbridgeError``; any other exception, or
more than ``FUZZ_TIME_BOUND`` seconds on one input, fails the harness with the input saved under
``.fuzz-failures/`` so it can become a regression test.

Each Hypothesis example draws one random number that drives a batch of inputs: which seed, and
1 to 8 edits (bit flips, bytes, interesting 32-bit words, deletions, insertions, truncation,
duplicated runs), half of them near the start or the end of the file, where headers, trailers,
indexes and signatures sit. Hypothesis costs milliseconds per example; batching keeps the kit's
own cost well under a millisecond per input, so the time goes to the code under test.

``SIGNBRIDGE_FUZZ_CASES`` sets the number of cases per harness (10,000 by default);
``./dev fuzz [CASES]`` runs every harness longer. Hypothesis keeps no example database: every run
starts from the seeds, so CI is reproducible from ``SIGNBRIDGE_FUZZ_SEED``. A target that needs its
input as a file writes it under :func:`scratch` (in memory where the machine has ``/dev/shm``:
rewriting a file on disk costs milliseconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st

from conftest import ROOT
from signbridge.errors import SignbridgeError

FUZZ_CASES = int(os.environ.get("SIGNBRIDGE_FUZZ_CASES", "10000"))
FUZZ_SEED = int(os.environ.get("SIGNBRIDGE_FUZZ_SEED", "20261203"))
FUZZ_TIME_BOUND = float(os.environ.get("SIGNBRIDGE_FUZZ_TIME_BOUND", "2.0"))
FAILURES = ROOT / ".fuzz-failures"
_MEMORY = Path("/dev/shm")

_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]


class FuzzTimeout(Exception):
    """One input took longer than the harness's time bound."""


_KINDS = ("flip", "byte", "word", "delete", "insert", "truncate", "duplicate")
_RANDOM_SEED = st.integers(0, 2**64 - 1)
# Inputs per Hypothesis example: Hypothesis costs milliseconds per example, a mutant a fraction of one.
_BATCH = 16
_EDGE = 4096  # headers, trailers, indexes and signatures sit near a file's start or end


def _position(rng: random.Random, size: int) -> int:
    """Where to mutate: anywhere, or (half the time) near the start or the end."""
    roll = rng.random()
    if roll < 0.25:
        return rng.randrange(min(size, _EDGE))
    if roll < 0.5:
        return size - 1 - rng.randrange(min(size, _EDGE))
    return rng.randrange(size)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 1 to 8 random edits: bit flips, bytes, interesting 32-bit words, deletions,
    insertions, truncation and duplicated runs."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.choice(_KINDS)
        size = len(buffer)
        where = _position(rng, size) if size else 0
        if kind == "flip" and size:
            buffer[where] ^= 1 << rng.randrange(8)
        elif kind == "byte" and size:
            buffer[where] = rng.randrange(256)
        elif kind == "word" and size >= 4:
            where = min(where, size - 4)
            buffer[where : where + 4] = struct.pack(rng.choice((">I", "<I")), rng.choice(_INTERESTING))
        elif kind == "delete" and size:
            del buffer[where : where + rng.randint(1, 64)]
        elif kind == "insert":
            buffer[where:where] = rng.randbytes(rng.randint(1, 32))
        elif kind == "truncate":
            del buffer[where:]
        elif kind == "duplicate" and size:
            buffer[where:where] = buffer[where : where + rng.randint(1, 256)]
    return bytes(buffer)


def _mutant(seeds: Sequence[bytes], rng: random.Random) -> bytes:
    """One of ``seeds``, mutated a few times (or, rarely, unchanged or random bytes)."""
    choice = rng.randrange(100)
    if choice == 0:
        return rng.randbytes(rng.randrange(513))
    original = rng.choice(seeds)
    return original if choice == 1 else _mutate(original, rng)


@st.composite
def mutants(draw, seeds: Sequence[bytes]) -> bytes:
    """A Hypothesis strategy for one mutant of ``seeds`` (see :func:`fuzz` for running many)."""
    return _mutant(list(seeds), random.Random(draw(_RANDOM_SEED)))


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
    seeds = list(seeds)
    count = 0
    slowest = 0.0
    started = time.monotonic()

    def run_one(data: bytes) -> None:
        nonlocal slowest
        begun = time.monotonic()
        try:
            _with_time_bound(target, data)
        except SignbridgeError:
            return
        except BaseException as error:
            FAILURES.mkdir(exist_ok=True)
            saved = FAILURES / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}"
            saved.write_bytes(data)
            error.add_note(f"fuzz {name}: input {count} ({len(data)} bytes) saved as {saved}")
            raise
        finally:
            slowest = max(slowest, time.monotonic() - begun)

    @seed(FUZZ_SEED)
    @settings(
        max_examples=-(-cases // _BATCH),
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,  # the failing input is saved to a file, not printed (it may be megabytes)
    )
    @given(_RANDOM_SEED)
    def run_batch(number: int) -> None:
        nonlocal count
        rng = random.Random(number)
        for _ in range(min(_BATCH, cases - count)):
            count += 1
            run_one(_mutant(seeds, rng))

    run_batch()
    elapsed = time.monotonic() - started
    print(f"fuzz {name}: {count} inputs in {elapsed:.1f} s, slowest {slowest:.3f} s")
    return count


def read_seeds(paths: Sequence[Path], limit: int = 4 << 20) -> list[bytes]:
    """The bytes of each seed file no larger than ``limit`` (fuzzing huge seeds wastes the budget)."""
    return [path.read_bytes() for path in paths if path.is_file() and path.stat().st_size <= limit]


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A private directory for the files a target reads, in memory when the machine has ``/dev/shm``."""
    base = _MEMORY if _MEMORY.is_dir() and os.access(_MEMORY, os.W_OK) else None
    directory = Path(tempfile.mkdtemp(prefix=f"signbridge-fuzz-{name}-", dir=base))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def input_file(name: str, filename: str) -> Iterator[Callable[[bytes], Path]]:
    """A function that writes an input to ``filename`` in a :func:`scratch` directory and returns its
    path, for targets that read a file as the command would."""
    with scratch(name) as directory:
        path = directory / filename

        def write(data: bytes) -> Path:
            path.write_bytes(data)
            return path

        yield write
