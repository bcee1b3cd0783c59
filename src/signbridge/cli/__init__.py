"""The ``signbridge`` command."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import SignbridgeError
from .admin import admin
from .codesign import codesign
from .demo import demo
from .productsign import pkgutil, productsign
from .provider import restart, start, status, stop
from .security import pluginkit, security
from .server import server


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="signbridge")
def cli() -> None:
    """Sign with the tools you know, with keys you never hold."""


cli.add_command(server)
cli.add_command(admin)
cli.add_command(demo)
cli.add_command(start)
cli.add_command(stop)
cli.add_command(status)
cli.add_command(restart)
cli.add_command(security)
cli.add_command(pluginkit)
cli.add_command(codesign)
cli.add_command(productsign)
cli.add_command(pkgutil)


def main() -> None:
    try:
        code = cli.main(standalone_mode=False, prog_name="signbridge")
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except SignbridgeError as exc:
        click.echo(f"signbridge: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    # Without standalone mode click returns the code of an Exit raised by a command.
    sys.exit(code if isinstance(code, int) else 0)
