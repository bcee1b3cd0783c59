"""A thread that makes in-process signatures while the event loop serves HTTP.

OpenSSL releases the GIL while it computes an RSA or ECDSA signature, so a signature made in a
thread of its own overlaps, on a second core, with the event loop's Python: HTTP parsing, JSON, the
authorization query, the hand-over to the audit writer. Only the signature is handed over (the
loop authorizes the request first and completes it after): a job on a C-level queue, and the result
posted back to the loop. The whole request in a general thread pool (``run_in_threadpool``) would
make both threads fight over the GIL for its Python.

When OpenSSL returns, the thread needs the GIL back, and the loop, busy with other requests, holds
it until the interpreter's switch interval runs out (5 ms by default, 20 times an RSA-2048
signature). While the thread runs, the interval is therefore cut to :data:`SWITCH_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

SWITCH_INTERVAL = 0.0001
"""Seconds a thread waits for the GIL before the interpreter makes its holder let go."""

_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]


class SigningThread:
    """Runs functions in one thread, one after the other, for the event loop that first calls :meth:`call`."""

    def __init__(self, name: str = "signbridge-signer") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_interval: float | None = None
        self._closed = False

    async def call(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``, run in the thread; its result, or the exception it raised."""
        if self._closed:
            raise RuntimeError("the signing thread has stopped")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._previous_interval = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL)
            self._thread.start()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((function, args, future))
        return await future

    def close(self) -> None:
        """Finish the jobs already handed over, then stop the thread."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._jobs.put(None)
            self._thread.join()
        if self._previous_interval is not None:
            sys.setswitchinterval(self._previous_interval)

    def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        while (job := self._jobs.get()) is not None:
            function, args, future = job
            try:
                result = function(*args)
            except BaseException as exc:  # noqa: BLE001 - raised again in the waiting request
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the request was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
