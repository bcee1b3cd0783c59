"""Lines to standard output or error as ``click.echo`` writes them, for commands that run without click."""

from __future__ import annotations

import re
import sys

_ANSI_STYLE = re.compile(r"\033\[[;?0-9]*[a-zA-Z]")


def echo(text: str, *, err: bool = False) -> None:
    """One line to standard output (or error), as ``click.echo`` writes it, without importing click:
    flushed, and ANSI styles removed unless the stream is a terminal."""
    stream = sys.stderr if err else sys.stdout
    if not stream.isatty():
        text = _ANSI_STYLE.sub("", text)
    stream.write(text + "\n")
    stream.flush()
