"""Options and output helpers shared by the command groups."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import platformdirs

if TYPE_CHECKING:
    pass

F = TypeVar("F", bound=Callable[..., Any])


def default_data_dir() -> Path:
    return Path(os.environ.get("SIGNBRIDGE_DATA_DIR") or platformdirs.user_data_dir("signbridge"))


def data_dir_option(function: F) -> F:
    function = click.option(
        "--database-url",
        envvar="SIGNBRIDGE_DATABASE_URL",
        help="SQLAlchemy URL of the database (default: SQLite in the data directory); e.g. postgresql://...",
    )(function)
    return click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=default_data_dir,
        show_default="$SIGNBRIDGE_DATA_DIR or the user data directory",
        help="The service's data directory.",
    )(function)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            click.echo("  ".join("-" * width for width in widths))
