"""``signbridge demo``."""

from __future__ import annotations

from pathlib import Path

import click

from ..demo.run import run_demo


@click.command()
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path), help="Keep the demo's files in this directory.")
def demo(keep: Path | None) -> None:
    """Run the whole signing path on a temporary demo service, and show what happens."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    run_demo(click.echo, keep=keep)
