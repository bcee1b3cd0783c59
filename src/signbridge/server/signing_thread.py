"""A thread that makes in-process signatures while the event loop serves HTTP.

OpenSSL releases the GIL while it computes an RSA or ECDSA signature, so a signature made in a
thread of its own overlaps, on a second core, with the event loop's Python: HTTP parsing, JSON, the
authorization query, the hand-over to the audit writer. Only the signature is handed over (the
loop authorizes the request first and completes it after). The whole request in a general thread pool (``run_in_threadpool``) would
make both threads fight over the GIL for its Python.

When OpenSSL returns, the thread needs the GIL back, and the loop, busy with other requests, holds
it until the interpreter's switch interval runs out (5 ms by default, 20 times an RSA-2048
signature). While the thread runs, the interval is therefore cut to :data:`SWITCH_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

SWITCH_INTERVAL = 0.0001
"""Seconds a thread waits for the GIL before the interpreter makes its holder let go."""

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]
_Result = tuple[asyncio.Future[Any], Any, BaseException | None]


class SigningThread:
    """Runs functions in one thread, one after the other, for the event loop that first calls :meth:`call`.

    Jobs and results travel in deques; each side wakes the other with a byte on a pipe, written
    with ``os.write``, which lets go of the GIL during the system call (a ``queue.SimpleQueue`` put
    or ``call_soon_threadsafe`` wakes the other side holding it). A byte is written only when the
    other side may be asleep: under load the thread finds the next job waiting and the loop has
    yet to collect the last results, and every system call that lets go of the GIL makes its
    caller wait to take it back."""

    def __init__(self, name: str = "signbridge-signer") -> None:
        self._jobs: collections.deque[_Job | None] = collections.deque()
        self._results: collections.deque[_Result] = collections.deque()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_interval: float | None = None
        self._closed = False
        self._thread_waiting = False  # set by the thread before it waits for a byte on the jobs pipe
        self._loop_woken = False  # set by the thread when it writes a byte on the results pipe
        self._jobs_in, self._jobs_out = os.pipe()
        self._results_in, self._results_out = os.pipe()
        os.set_blocking(self._results_in, False)

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``, run in the thread; its result, or the exception it raised."""
        if self._closed:
            raise RuntimeError("the signing thread has stopped")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._results_in, self._deliver)
            self._previous_interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL)
            self._thread.start()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.append((function, args, future))
        if self._thread_waiting:
            os.write(self._jobs_out, b"j")
        return await future

    def close(self) -> None:
        """Finish the jobs already handed over, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None:
            self._jobs.append(None)
            os.write(self._jobs_out, b"j")
            self._thread.join()
            if not loop.is_closed():
                loop.remove_reader(self._results_in)
                self._deliver()
        for fd in (self._jobs_in, self._jobs_out, self._results_in, self._results_out):
            os.close(fd)
        if self._previous_interval is not None:
            sys.setswitchinterval(self._previous_interval)

    def _run(self) -> None:
        while True:
            self._thread_waiting = True
            if not self._jobs:  # checked after the flag is set: a job appended before it is seen here
                os.read(self._jobs_in, 4096)  # bytes of jobs found without waiting are read with a later one
            self._thread_waiting = False
            while self._jobs:
                job = self._jobs.popleft()
                if job is None:
                    return
                function, args, future = job
                try:
                    self._results.append((future, function(*args), None))
                except BaseException as exc:  # noqa: BLE001 - raised again in the waiting request
                    self._results.append((future, None, exc))
                if not self._loop_woken:
                    self._loop_woken = True
                    os.write(self._results_out, b"r")

    def _deliver(self) -> None:
        try:
            os.read(self._results_in, 4096)
        except BlockingIOError:
            return  # a byte for results already delivered
        self._loop_woken = False  # before the deque is emptied: a result appended later writes a byte
        while self._results:
            future, result, exc = self._results.popleft()
            if future.done():  # the request was cancelled
                continue
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)
