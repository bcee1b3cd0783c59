"""Short commands start fast because they import only what they use (an import list, not a timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from corpuskit import apple_anchor_env, corpus_item
from signbridge.cli import COMMANDS, cli

HEAVY = ("sqlalchemy", "httpx", "rich", "cryptography.x509", "asn1crypto", "signbridge.server", "signbridge.apple", "uvicorn")
# What codesign's display and verification of one Mach-O file never need: click (codesign parses its
# own arguments), the HTTP client (only timestamping uses it), progress bars, the signing engine,
# tokens and the PKCS#11 client (only signing finds an identity), bundles, disk images and archives.
NOT_FOR_CODESIGN_CHECKS = (
    "click", "httpx", "httpcore", "rich", "pygments", "sqlalchemy", "uvicorn", "signbridge.server",
    "signbridge.api", "signbridge.keychain", "signbridge.pkcs11", "signbridge.provider", "signbridge.config",
    "signbridge.apple.codesign", "signbridge.apple.macho.sign", "signbridge.apple.bundle.layout",
    "signbridge.apple.bundle.resources", "signbridge.apple.dmg.verify", "signbridge.apple.dmg.sign", "zipfile",
    "signbridge.apple.codesig.cms_signing", "signbridge.crypto.cms_builder", "signbridge.crypto.timestamp_requests",
)  # fmt: skip
DYLIB = "macho/htacg_tidy-mac-installer__libtidy.5.6.0.dylib"  # Developer ID, timestamped
UNTIMESTAMPED = "macho/northpolesec_santa__signed-with-teamid"  # Apple Development, signing time only


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


def _imported_by_main(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules loaded when ``signbridge ARGS`` ran to its exit (through the console entry point)."""
    listing = tmp_path / "modules.txt"
    code = (
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(listing)!r}, 'w').write('\\n'.join(sorted(sys.modules))))\n"
        f"sys.argv = ['signbridge', *{list(args)!r}]\n"
        "from signbridge.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    return set(listing.read_text().split()), proc


def _matching(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in modules if any(name == p or name.startswith(p + ".") for p in prefixes))


def test_codesign_display_imports_only_what_it_shows(tmp_path: Path) -> None:
    path = corpus_item(DYLIB)
    modules, proc = _imported_by_main(tmp_path, "codesign", "-dvvv", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "Authority=Developer ID Application: James Derry (9PN2JXXG7Y)" in proc.stderr
    assert not _matching(modules, NOT_FOR_CODESIGN_CHECKS), _matching(modules, NOT_FOR_CODESIGN_CHECKS)
    assert {"signbridge.apple.display", "signbridge.apple.codesig.cms"} <= modules


def test_codesign_verify_imports_no_signing_or_network(tmp_path: Path) -> None:
    path = corpus_item(DYLIB)
    modules, proc = _imported_by_main(tmp_path, "codesign", "--verify", "-v", str(path), env=apple_anchor_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"{path}: valid on disk\n{path}: satisfies its Designated Requirement\n"
    # Verification reads the TrustAnchors setting; a lone Mach-O file needs no bundle reader.
    allowed = {"signbridge.config"}
    unexpected = [name for name in _matching(modules, NOT_FOR_CODESIGN_CHECKS) if name not in allowed]
    assert not unexpected, unexpected
    assert "signbridge.apple.macho.verify" in modules


@pytest.mark.parametrize("item", [DYLIB, UNTIMESTAMPED], ids=["timestamped", "untimestamped"])
@pytest.mark.parametrize("args", [("-dvvv",), ("--verify", "-v")], ids=["display", "verify"])
def test_codesign_checks_read_the_cms_without_asn1crypto(tmp_path: Path, item: str, args: tuple[str, ...]) -> None:
    """The CMS signature, its certificates and its timestamp token are read without asn1crypto."""
    path = corpus_item(item)
    modules, proc = _imported_by_main(tmp_path, "codesign", *args, str(path), env=apple_anchor_env())
    assert proc.returncode == 0, proc.stderr
    assert ("Timestamp=" in proc.stderr) == (item == DYLIB and "-dvvv" in args)
    assert "signbridge.crypto.cms" in modules
    assert not _matching(modules, ("asn1crypto",)), _matching(modules, ("asn1crypto",))


def test_codesign_without_click_behaves_as_through_the_group(tmp_path: Path) -> None:
    """The click command the group resolves runs the same function (usage errors: exit 2)."""
    modules, direct = _imported_by_main(tmp_path, "codesign", "--no-such-option")
    through = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom signbridge.cli import cli\n"
         "cli.main(['codesign', '--no-such-option'], prog_name='signbridge')"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "click" not in modules
    assert direct.returncode == through.returncode == 2
    assert direct.stderr == through.stderr
    assert direct.stderr.startswith("signbridge codesign: unrecognized option '--no-such-option'\nUsage: ")


def test_start_front_end_imports_no_token_internals(tmp_path: Path) -> None:
    """`signbridge start` only spawns the token process: no HTTP client, PKCS#11 or certificate parsing."""
    modules, proc = _imported_by_main(tmp_path, "start", "--help")
    assert proc.returncode == 0, proc.stderr
    heavy = ("httpx", "rich", "asn1crypto", "cryptography.x509", "signbridge.api", "signbridge.pkcs11", "signbridge.apple")
    assert not _matching(modules, heavy), _matching(modules, heavy)
    assert "signbridge.provider.daemon" in modules


def test_token_process_imports_what_serving_needs() -> None:
    """The token process's modules (daemon and what it imports to start): no click, rich, asn1crypto
    (its objects take the certificates' fields from their DER directly), PKCS#11 client."""
    # What TokenProcess.start imports when the token starts, then the module list.
    probe = (
        "import sys\n"
        "import signbridge.provider.daemon, signbridge.api.client, signbridge.pkcs11.server, signbridge.pkcs11.token\n"
        "import signbridge.provider.loader, signbridge.provider.signer\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    modules = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split())
    unneeded = ("click", "rich", "pygments", "sqlalchemy", "asn1crypto", "signbridge.pkcs11.client", "signbridge.apple",
                "signbridge.cli", "signbridge.keychain")  # fmt: skip
    assert not _matching(modules, unneeded), _matching(modules, unneeded)
    assert {"httpx", "signbridge.pkcs11.server", "signbridge.pkcs11.identity"} <= modules


def test_pkgutil_check_signature_imports_no_signing(tmp_path: Path) -> None:
    package = corpus_item("pkg/htacg_binaries__HTML_Tidy-5.2.0.pkg")
    modules, proc = _imported_by_main(tmp_path, "pkgutil", "--check-signature", str(package), env=apple_anchor_env())
    assert proc.returncode == 0, proc.stderr
    assert "Status: signed by a developer certificate issued by Apple" in proc.stdout
    signing = ("httpx", "rich", "signbridge.keychain", "signbridge.pkcs11", "signbridge.provider", "signbridge.apple.codesign")
    assert not _matching(modules, signing), _matching(modules, signing)


def test_security_find_identity_imports_no_token_server_or_network(tmp_path: Path) -> None:
    env = {**os.environ, "SIGNBRIDGE_RUNTIME_DIR": str(tmp_path / "run")}  # no token runs there
    modules, proc = _imported_by_main(tmp_path, "security", "find-identity", "-v", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "     0 valid identities found\n"
    unneeded = ("httpx", "rich", "asn1crypto", "signbridge.api", "signbridge.pkcs11.server", "signbridge.pkcs11.identity")
    assert not _matching(modules, unneeded), _matching(modules, unneeded)
