"""``signbridge stapler``: Apple's stapler (staple, validate) for apps, disk images and packages."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..apple.notary.errors import StapleError, TicketError
from ..apple.notary.stapler import staple as staple_path
from ..apple.notary.stapler import validate as validate_path
from ..apple.trust import load_anchors

FAILURE = 65  # stapler's exit status when an action fails (EX_DATAERR)


def _anchors(spec: str | None) -> tuple:
    return tuple(load_anchors(spec)) if spec else ()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def stapler() -> None:
    """Attach and validate notarization tickets (Apple's stapler command line)."""


@stapler.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="Say which record was looked up and what the ticket covers.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@click.option("--ticket", "ticket_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Staple this ticket file instead of fetching one (signbridge extension).")
@click.option("--wait", "wait_seconds", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="Keep retrying 'record not found' this long (tickets appear minutes after notarization).")
@click.option("--anchors", envvar="SIGNBRIDGE_TICKET_ANCHORS", metavar="PATH",
              help="Certificates that may issue the ticket's CA (Apple Root CA - G3).")
def staple(path: Path, verbose: bool, quiet: bool, ticket_file: Path | None, wait_seconds: float,
           anchors: str | None) -> None:
    """Fetch the notarization ticket for PATH and staple it."""
    if not quiet:
        click.echo(f"Processing: {path}")
    try:
        ticket = staple_path(
            path,
            ticket=ticket_file.read_bytes() if ticket_file else None,
            wait=wait_seconds,
            anchors=_anchors(anchors),
        )
    except (StapleError, TicketError) as exc:
        click.echo(str(exc), err=True)
        click.echo(f"The staple and validate action failed! Error {FAILURE}.", err=True)
        sys.exit(FAILURE)
    if verbose:
        click.echo(f"Ticket issued {ticket.issued:%Y-%m-%d %H:%M:%S} UTC covering {len(ticket.entries)} hashes")
    if not quiet:
        click.echo("The staple and validate action worked!")


@stapler.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("-v", "--verbose", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
@click.option("--anchors", envvar="SIGNBRIDGE_TICKET_ANCHORS", metavar="PATH",
              help="Certificates that may issue the ticket's CA (Apple Root CA - G3).")
def validate(path: Path, verbose: bool, quiet: bool, anchors: str | None) -> None:
    """Check offline that PATH carries a ticket that covers it."""
    if not quiet:
        click.echo(f"Processing: {path}")
    try:
        ticket = validate_path(path, _anchors(anchors))
    except (StapleError, TicketError) as exc:
        click.echo(str(exc), err=True)
        click.echo(f"The validate action failed! Error {FAILURE}.", err=True)
        sys.exit(FAILURE)
    if verbose:
        for entry in ticket.entries:
            click.echo(f"  {entry}")
    if not quiet:
        click.echo("The validate action worked!")
