"""Short commands start fast because they import only what they use (an import list, not a timing)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from signbridge.cli import COMMANDS, cli

HEAVY = ("sqlalchemy", "httpx", "rich", "cryptography.x509", "asn1crypto", "signbridge.server", "signbridge.apple", "uvicorn")


def _imported_by(*args: str) -> set[str]:
    code = (
        "import sys\n"
        "from signbridge.cli import cli\n"
        "try:\n"
        f"    cli.main({list(args)!r}, standalone_mode=False, prog_name='signbridge')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('\\n'.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(proc.stderr.split())


@pytest.mark.parametrize("args", [("--help",), ("--version",)])
def test_top_level_help_imports_no_command(args: tuple[str, ...]) -> None:
    modules = _imported_by(*args)
    heavy = sorted(name for name in modules if name.startswith(HEAVY))
    assert not heavy, heavy


def test_every_listed_command_resolves_with_its_help() -> None:
    context = click.Context(cli)
    for name, (_target, short_help) in COMMANDS.items():
        command = cli.get_command(context, name)
        assert isinstance(command, click.Command), name
        assert short_help.endswith(".") and len(short_help) <= 66, name
