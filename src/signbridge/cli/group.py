"""The click group of ``signbridge``, its commands imported only when they run (see COMMANDS)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click

from .. import __version__
from .commands import COMMANDS, OWN_ARGUMENTS, command_target


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target = command_target(cmd_name)
        return _own_arguments_command(cmd_name, target) if cmd_name in OWN_ARGUMENTS else target

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short_help) for name, (_target, short_help) in COMMANDS.items()])


def _own_arguments_command(name: str, run: Callable[[Sequence[str]], int]) -> click.Command:
    """A click command that hands every argument, unparsed, to ``run`` and exits with its code."""

    @click.pass_context
    def invoke(context: click.Context, argv: tuple[str, ...]) -> None:
        context.exit(run(argv))

    return click.Command(
        name,
        callback=invoke,
        params=[click.Argument(["argv"], nargs=-1, type=click.UNPROCESSED)],
        help=run.__doc__,
        short_help=COMMANDS[name][1],
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
        add_help_option=False,
    )


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="signbridge")
def cli() -> None:
    """Sign with the tools you know, with keys you never hold."""


def run_group() -> int:
    """Run the group on ``sys.argv``; the exit code."""
    try:
        code = cli.main(standalone_mode=False, prog_name="signbridge")
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 130
    # Without standalone mode click returns the code of an Exit raised by a command.
    return code if isinstance(code, int) else 0
