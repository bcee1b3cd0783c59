"""``signbridge security`` and ``signbridge pluginkit``: the troubleshooting commands of a macOS token.

Their output follows Apple's tools (``security list-smartcards``, ``security find-identity``,
``pluginkit -m``), so instructions and scripts written for SignPath's CryptoTokenKit provider
read the same here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import click

from .. import p11kit
from ..apple.certificates import Usage, usage
from ..crypto.identity import Identity
from ..keychain.discovery import discover, validity_problem
from ..keychain.tokens import DRIVER_ID, NoTokenError, find_tokens, p11kit_registration, smartcard_id
from ..provider import registry

NO_SMARTCARDS_EXIT = 44  # Apple's `security` exits with errSecItemNotFound (-25300) as a byte
CTK_PROTOCOL = "com.apple.ctk-tokens"
POLICIES = {"codesigning": "Code Signing", "basic": "X.509 Basic"}  # in the order Apple prints them


@click.group()
def security() -> None:
    """Tokens and identities, as macOS's `security` shows them."""


@click.command("list-smartcard")
@click.pass_context
def list_smartcard(context: click.Context) -> None:
    """Print each running token as <driver id>:<token name>.

    The driver id is always io.signbridge.token. With no token running, prints "No smartcards
    found." on stderr and exits 44, as Apple's security does.
    """
    tokens = registry.running_tokens()
    if not tokens:
        click.echo("No smartcards found.", err=True)
        click.echo("(no signbridge token is running; start one with `signbridge start`)", err=True)
        context.exit(NO_SMARTCARDS_EXIT)
    for token in tokens:
        click.echo(smartcard_id(token))


security.add_command(list_smartcard)
security.add_command(list_smartcard, name="list-smartcards")  # Apple's spelling


@security.command("find-identity")
@click.option("-v", "valid_only", is_flag=True, help="Show valid identities only.")
@click.option(
    "-p",
    "policies",
    multiple=True,
    type=click.Choice(list(POLICIES)),
    help="Policy to evaluate: codesigning (code-signing identities) or basic (all; the default).",
)
@click.argument("token_names", metavar="[TOKEN]...", nargs=-1)
def find_identity(valid_only: bool, policies: Sequence[str], token_names: Sequence[str]) -> None:
    """List the identities of the running tokens (or of the TOKENs named), in Apple's format.

    An identity is valid when its certificates are within their validity period and its chain
    ends at a root certificate the token serves; others are listed with the reason Apple gives
    (CSSMERR_TP_CERT_EXPIRED, CSSMERR_TP_CERT_NOT_VALID_YET, CSSMERR_TP_NOT_TRUSTED).
    """
    identities: Sequence[Identity] = ()
    if token_names or registry.running_tokens():
        found = discover(tokens=find_tokens(token_names))
        identities = found.identities
        for problem in found.problems:
            click.echo(f"signbridge: warning: {problem}", err=True)
    else:
        click.echo(f"signbridge: warning: {NoTokenError()}", err=True)
    now = datetime.now(UTC)
    problems = {id(identity): validity_problem(identity, now=now) for identity in identities}
    for policy in [name for name in POLICIES if name in (policies or ("basic",))]:
        listed = [i for i in identities if policy == "basic" or usage(i.certificate) is Usage.CODE]
        if not valid_only:
            click.echo(f"\nPolicy: {POLICIES[policy]}")
            click.echo("  Matching identities")
            for number, identity in enumerate(listed, start=1):
                click.echo(_identity_line(number, identity, problems[id(identity)]))
            click.echo(f"     {len(listed)} identities found\n")
            click.echo("  Valid identities only")
        valid = [identity for identity in listed if problems[id(identity)] is None]
        for number, identity in enumerate(valid, start=1):
            click.echo(_identity_line(number, identity, None))
        click.echo(f"     {len(valid)} valid identities found")


def _identity_line(number: int, identity: Identity, problem: str | None) -> str:
    line = f'{number:3d}) {identity.sha1} "{identity.common_name}"'
    return f"{line} ({problem})" if problem else line


@click.command()
@click.option("-m", "--match", "match", is_flag=True, help="List matching plug-ins (the default).")
@click.option("-v", "--verbose", is_flag=True, help="Each token with its socket and p11-kit state.")
@click.option("-A", "--all-versions", is_flag=True, help="Accepted for Apple's command line.")
@click.option("-D", "--duplicates", is_flag=True, help="Accepted for Apple's command line.")
@click.option("-p", "--protocol", "protocols", multiple=True, help=f"Only this protocol ({CTK_PROTOCOL}).")
@click.option(
    "-i", "--identifier", "identifiers", multiple=True, help=f"Only this driver ({DRIVER_ID})."
)
def pluginkit(
    match: bool,
    verbose: bool,
    all_versions: bool,
    duplicates: bool,
    protocols: Sequence[str],
    identifiers: Sequence[str],
) -> None:
    """Show the registered token driver, as `pluginkit -m -v -p com.apple.ctk-tokens` does.

    One line per driver version: "+" in the first column when p11-kit sees every token of it.
    With -v, one line per running token (driver(version), token name, start time, socket) and
    whether p11-kit sees its registration, i.e. whether PKCS#11 consumers find it with no module
    path.
    """
    if protocols and CTK_PROTOCOL not in protocols:
        return  # nothing of ours matches: pluginkit prints nothing
    if identifiers and DRIVER_ID not in identifiers:
        return
    tokens = registry.running_tokens()
    if not tokens:
        raise NoTokenError()
    listing = p11kit.list_p11kit_modules()
    registrations = {token.name: p11kit_registration(token, listing) for token in tokens}
    if verbose:
        for token in tokens:
            registration = registrations[token.name]
            mark = "+" if registration.registered else " "
            fields = [f"{DRIVER_ID}({token.version})", token.name, token.started, token.socket]
            click.echo(f"{mark}    " + "\t".join(fields))
            click.echo(f"     registered with p11-kit: {registration.describe()}")
        return
    for version in dict.fromkeys(token.version for token in tokens):
        same = [registrations[token.name] for token in tokens if token.version == version]
        mark = "+" if all(registration.registered for registration in same) else " "
        click.echo(f"{mark}    {DRIVER_ID}({version})")
