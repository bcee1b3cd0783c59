"""``signbridge start|stop|status|restart``: the crypto provider's token processes."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import NotFoundError, SignbridgeError, UsageError
from ..p11kit import client_module_path
from ..provider import daemon, registration, registry
from ..provider.naming import check_name, token_name
from ..provider.settings import load_settings, require_connection_settings
from .common import print_json

_SHOWN_IDENTITIES = 10


def ready_lines(record: registry.TokenRecord, notes: tuple[str, ...] = (), *, already: bool = False) -> list[str]:
    """What a user needs once a token is ready: its identities, and how tools reach it."""
    state = "is already running" if already else "is ready"
    plural = "y" if record.identities == 1 else "ies"
    lines = [
        f"Token {record.name} {state}: {record.identities} identit{plural} from {record.api_url} "
        f"(organization {record.organization_id}, process {record.pid})",
    ]
    lines += [f"  {key_id}" for key_id in record.key_ids[:_SHOWN_IDENTITIES]]
    if len(record.key_ids) > _SHOWN_IDENTITIES:
        lines.append(f"  ... and {len(record.key_ids) - _SHOWN_IDENTITIES} more (signbridge status --json lists them)")
    example = record.key_ids[0] if record.key_ids else "PROJECT/POLICY"
    uri = f"pkcs11:token={record.name};object={example.replace('/', '%2F')};type=private"
    if record.module_file:
        lines += [
            f"Registered with p11-kit: {record.module_file}",
            "  Tools that load p11-kit-proxy.so (OpenSSL's pkcs11 engine, p11tool) find it with no module path:",
            f"  openssl dgst -engine pkcs11 -keyform engine -sign '{uri};pin-value=CONFIG' -sha256 FILE",
        ]
    client = client_module_path() or "p11-kit-client.so (Debian package p11-kit-modules)"
    lines += [
        "Or connect a tool to the token directly:",
        f"  export P11_KIT_SERVER_ADDRESS={record.server_address}",
        f"  pkcs11-tool --module {client} --login --pin CONFIG --list-objects",
    ]
    lines += [f"Note: {note}" for note in notes]
    lines.append(f"Stop it with: signbridge stop {record.name}")
    return lines


@click.command()
@click.option("--config", metavar="FILE", help="JSON config file with SignPath's keys (else $SIGNPATH_CONFIG_FILE).")
@click.option("--api-url", metavar="URL", help="The signing service's API URL (default https://app.signpath.io/Api).")
@click.option("--project-slug", metavar="P", help="Load only this project's signing policies.")
@click.option("--signing-policy-slug", metavar="S", help="Load only signing policies with this slug.")
@click.option("--organization-id", metavar="ID", help="The organization id (a GUID).")
@click.option("--api-token", metavar="T", help="An API token (better: SIGNPATH_API_TOKEN or the config file).")
@click.option("--foreground", is_flag=True, help="Stay attached (for service managers and containers).")
@click.option("--name", metavar="NAME", help="The token's name (default: derived from the organization and filters).")
def start(foreground: bool, name: str | None, **options: Any) -> None:
    """Load the certificates you may sign with and serve them as a PKCS#11 token.

    Returns once the token is ready (certificates loaded, socket listening, registered with
    p11-kit), or exits non-zero with one line saying why it could not start.
    """
    settings = load_settings(cli=options)
    require_connection_settings(settings)
    assert settings.organization_id is not None
    for warning in settings.warnings:
        click.echo(f"signbridge: warning: {warning}", err=True)
    name = check_name(name) if name else token_name(
        settings.organization_id, settings.project_slug, settings.signing_policy_slug
    )
    existing = registry.find(name)
    if existing is not None and registry.is_live(existing):
        for line in ready_lines(existing, already=True):
            click.echo(line)
        return
    if foreground:
        raise click.exceptions.Exit(_run_in_foreground(settings, name))
    waited = []

    def on_waiting(reason: str) -> None:
        if not waited and sys.stderr.isatty():
            click.echo(
                f"signbridge: waiting for the signing service ({reason}); trying for up to "
                f"{settings.service_unavailable_timeout:g} s",
                err=True,
            )
        waited.append(reason)

    started = daemon.spawn(settings, name, on_waiting)
    for line in ready_lines(started.record, started.notes):
        click.echo(line)


def _run_in_foreground(settings: Any, name: str) -> int:
    waited = []

    def report(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "waiting" and not waited:
            waited.append(event)
            click.echo(f"signbridge: waiting for the signing service ({event['reason']})", err=True)
        elif kind == "ready":
            record = registry.TokenRecord.from_json(event["record"])
            for line in ready_lines(record, tuple(event.get("notes", ()))):
                click.echo(line)
            sys.stdout.flush()
        elif kind == "failed":
            click.echo(f"signbridge: error: {event['message']}", err=True)

    return daemon.run_token(settings, name, report, detach=False)


@click.command()
@click.argument("name", required=False)
@click.option("--all", "stop_all", is_flag=True, help="Stop every running token.")
def stop(name: str | None, stop_all: bool) -> None:
    """Stop a token (the only one running, NAME, or --all) and remove its registration."""
    if name and stop_all:
        raise UsageError("give a token NAME or --all, not both")
    running = registry.running_tokens()
    if stop_all:
        targets = running
    elif name:
        targets = [record for record in running if record.name == name]
        if not targets:
            others = f"; running: {', '.join(r.name for r in running)}" if running else ""
            registry.remove_stale()
            raise NotFoundError(f"no token named {name} is running{others}")
    elif len(running) > 1:
        names = ", ".join(record.name for record in running)
        raise UsageError(f"several tokens are running ({names}); name one, or use --all")
    else:
        targets = running
    if not targets:
        click.echo("signbridge: no token is running", err=True)
    failed = []
    for record in targets:
        if daemon.stop(record):
            click.echo(f"Stopped {record.name} (process {record.pid})")
        else:
            failed.append(record.name)
    registry.remove_stale()
    registration.remove_orphans()
    if failed:
        raise SignbridgeError(f"could not stop {', '.join(failed)}")


def _status_json(record: registry.TokenRecord, state: str) -> dict[str, Any]:
    return {**record.to_json(), "state": state, "server_address": record.server_address}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """The running tokens: their identities, socket and p11-kit registration."""
    running = registry.running_tokens()
    stale = registry.stale_tokens()
    orphans = [str(path) for path in registration.our_module_files() if registration.module_is_stale(path)]
    if as_json:
        print_json({
            "tokens": [_status_json(record, "running") for record in running],
            "stale": [_status_json(record, "stale") for record in stale],
            "stale_module_files": orphans,
            "p11kit_module_dir": str(registration.module_dir()),
        })
        return
    if not running:
        click.echo("No token is running. Start one with: signbridge start")
    for record in running:
        filters = ", ".join(
            f"{what} {value}"
            for what, value in (("project", record.project_slug), ("policy", record.signing_policy_slug))
            if value
        )
        click.echo(f"{record.name}: running, process {record.pid}, since {record.started}")
        click.echo(f"  service:    {record.api_url} (organization {record.organization_id})")
        click.echo(f"  loads:      {filters or 'every policy the API token may use'}")
        click.echo(f"  identities: {record.identities} (loaded {record.loaded})")
        for key_id in record.key_ids[:_SHOWN_IDENTITIES]:
            click.echo(f"    {key_id}")
        if len(record.key_ids) > _SHOWN_IDENTITIES:
            click.echo(f"    ... and {len(record.key_ids) - _SHOWN_IDENTITIES} more")
        click.echo(f"  socket:     P11_KIT_SERVER_ADDRESS={record.server_address}")
        click.echo(f"  p11-kit:    {record.module_file or 'not registered'}")
        if record.last_error:
            click.echo(f"  last reload failed: {record.last_error}")
        if record.log_file:
            click.echo(f"  log:        {record.log_file}")
    if stale or orphans:
        names = [f"{record.name} (process {record.pid} is gone)" for record in stale] + orphans
        click.echo(f"Stale, ignored, removed by the next start or restart: {'; '.join(names)}")


@click.command()
@click.option("--wait", "wait_seconds", type=float, default=60.0, show_default=True,
              help="Seconds to wait for each token to reload its certificates.")
def restart(wait_seconds: float) -> None:
    """Reload the certificates of every running token and drop stale registrations (like `killall ctkd`)."""
    for record in registry.remove_stale():
        click.echo(f"Removed the stale token {record.name} (process {record.pid} was gone)")
    for path in registration.remove_orphans():
        click.echo(f"Removed the stale p11-kit module file {path}")
    running = registry.running_tokens()
    if not running:
        click.echo("signbridge: no token is running", err=True)
        return
    failed = []
    for record in running:
        reloaded = daemon.reload(record, wait_seconds)
        if reloaded is None:
            failed.append(f"{record.name} did not finish reloading within {wait_seconds:g} s")
        elif reloaded.last_error:
            failed.append(f"{record.name} kept its previous certificates: {reloaded.last_error}")
        else:
            click.echo(f"Restarted {record.name}: {reloaded.identities} identities")
    if failed:
        raise SignbridgeError("; ".join(failed))
