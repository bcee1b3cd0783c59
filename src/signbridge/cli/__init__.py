"""The ``signbridge`` command."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import SignbridgeError
from .commands import COMMANDS, OWN_ARGUMENTS, command_target
from .output import echo

__all__ = ["COMMANDS", "OWN_ARGUMENTS", "command_target", "echo", "main"]


def __getattr__(name: str) -> Any:
    if name == "cli":  # the click group, made on first use (see OWN_ARGUMENTS)
        from .group import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    arguments = sys.argv[1:]
    if arguments and arguments[0] in OWN_ARGUMENTS:
        run: Callable[[Sequence[str]], int] = command_target(arguments[0])
        _exit_with(lambda: run(arguments[1:]))
    from .group import run_group

    _exit_with(run_group)


def _exit_with(run: Callable[[], int]) -> None:
    try:
        code = run()
    except SignbridgeError as exc:
        echo(f"signbridge: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)
