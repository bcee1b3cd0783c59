"""The ``signbridge`` command."""

from __future__ import annotations

import importlib
import sys

import click

from .. import __version__
from ..errors import SignbridgeError

# Command name -> ("module:attribute", the one-line help). A command's module is imported only when
# that command runs: `signbridge start` should not pay for the service's database layer, nor
# codesign for the server, nor `signbridge --help` for any of them.
COMMANDS = {
    "server": ("server:server", "Create a data directory and run the signing service."),
    "admin": ("admin:admin", "Administer the signing service's data directory."),
    "audit": ("audit:audit", "Check audit exports offline."),
    "demo": ("demo:demo", "Run the whole signing path on a temporary demo service."),
    "start": ("provider:start", "Serve the certificates you may sign with as a PKCS#11 token."),
    "stop": ("provider:stop", "Stop a token (the only one running, NAME, or --all)."),
    "status": ("provider:status", "The running tokens, their identities and registration."),
    "restart": ("provider:restart", "Reload the certificates of every running token."),
    "security": ("security:security", "Tokens and identities, as macOS's `security` shows them."),
    "pluginkit": ("security:pluginkit", "The registered token driver, as `pluginkit -m -v -p` shows it."),
    "codesign": ("codesign:codesign", "Sign, verify and display code signatures (Apple's codesign)."),
    "productsign": ("productsign:productsign", "Sign an installer package (Apple's productsign)."),
    "pkgutil": ("productsign:pkgutil", "Check an installer package's signature (Apple's pkgutil)."),
    "notarytool": ("notarytool:notarytool", "Check, submit and follow notarization (Apple's notarytool)."),
    "stapler": ("stapler:stapler", "Staple and validate notarization tickets (Apple's stapler)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attribute = entry[0].split(":")
        return getattr(importlib.import_module(f"{__name__}.{module_name}"), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short_help) for name, (_target, short_help) in COMMANDS.items()])


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
