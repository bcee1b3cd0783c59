"""The ``signbridge`` command."""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import SignbridgeError

# Command name -> "module:attribute". A command's module is imported only when that command runs:
# `signbridge start` should not pay for the service's database layer, nor codesign for the server.
COMMANDS = {
    "server": "server:server",
    "admin": "admin:admin",
    "audit": "audit:audit",
    "demo": "demo:demo",
    "start": "provider:start",
    "stop": "provider:stop",
    "status": "provider:status",
    "restart": "provider:restart",
    "security": "security:security",
    "pluginkit": "security:pluginkit",
    "codesign": "codesign:codesign",
    "productsign": "productsign:productsign",
    "pkgutil": "productsign:pkgutil",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module_name}"), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="signbridge")
def cli() -> None:
    """Sign with the tools you know, with keys you never hold."""


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
