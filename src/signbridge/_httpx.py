"""httpx without its command line: every module of signbridge imports httpx from here.

httpx's package imports its own command-line tool (``httpx._main``: click, rich and pygments,
about a third of httpx's import time) whenever those are installed. signbridge never runs that
tool, so the import is made to fail, and httpx then keeps a stub ``main``.
"""

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import httpx  # noqa: E402 - after the entry above

__all__ = ["httpx"]
