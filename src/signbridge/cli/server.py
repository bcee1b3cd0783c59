"""``signbridge server``: create a data directory and run the signing service."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from uvicorn.config import LOGGING_CONFIG

from ..atomic import write_atomically
from ..config import is_loopback_host
from ..errors import UsageError
from ..provider.registry import pid_alive
from ..server.database import redact_url
from ..server.datadir import init_data_dir, open_data_dir
from ..server.demo_org import create_demo
from ..server.keystores.factory import describe_keystore
from .common import data_dir_option, print_json

# Read by prometheus_client when it is first imported: this module must not import it.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--metrics-address must be HOST:PORT, not {text!r}")
    return host or "127.0.0.1", int(port)


@click.group()
def server() -> None:
    """Create a data directory and run the signing service."""


def _keystore_settings(kind: str, module: str | None, label: str | None, pin_env: str | None, pin_file: str | None) -> dict[str, Any]:
    if kind == "software":
        return {"backend": "software"}
    if not module or not label:
        raise UsageError("--keystore pkcs11 needs --pkcs11-module and --pkcs11-token-label")
    if bool(pin_env) == bool(pin_file):
        raise UsageError("--keystore pkcs11 needs exactly one of --pkcs11-pin-env or --pkcs11-pin-file")
    settings: dict[str, Any] = {"backend": "pkcs11", "module": module, "tokenLabel": label}
    settings["pinEnv" if pin_env else "pinFile"] = pin_env or str(Path(pin_file).resolve())  # type: ignore[arg-type]
    return settings


@server.command()
@data_dir_option
@click.option("--demo", is_flag=True, help="Also create the Demo Corp organization, its CA, policies and CI user.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--keystore", type=click.Choice(["software", "pkcs11"]), default="software", show_default=True)
@click.option("--pkcs11-module", help="PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).")
@click.option("--pkcs11-token-label", help="Label of the token that holds the keys.")
@click.option("--pkcs11-pin-env", metavar="VAR", help="Environment variable that holds the token's user PIN.")
@click.option("--pkcs11-pin-file", metavar="FILE", help="File that holds the token's user PIN.")
def init(
    data_dir: Path,
    database_url: str | None,
    demo: bool,
    as_json: bool,
    keystore: str,
    pkcs11_module: str | None,
    pkcs11_token_label: str | None,
    pkcs11_pin_env: str | None,
    pkcs11_pin_file: str | None,
) -> None:
    """Create a data directory (and, with --demo, the demo organization)."""
    settings = _keystore_settings(keystore, pkcs11_module, pkcs11_token_label, pkcs11_pin_env, pkcs11_pin_file)
    store = init_data_dir(data_dir, database_url=database_url, keystore=settings)
    try:
        result: dict[str, Any] = {
            "dataDir": str(store.settings.data_dir),
            "databaseUrl": redact_url(store.settings.database_url),
            "keystore": describe_keystore(store.settings.keystore),
        }
        if demo:
            with store.session() as session:
                info = create_demo(session, store.keystore)
            root = store.settings.data_dir / "demo-root.pem"
            write_atomically(root, info.root_pem.encode())
            result |= {
                "organizationId": info.organization_id,
                "apiToken": info.api_token,
                "projectSlug": info.project_slug,
                "signingPolicySlugs": list(info.policy_slugs),
                "ciUser": info.ci_user,
                "rootCertificate": str(root),
            }
    finally:
        store.close()
    if as_json:
        print_json(result)
        return
    click.echo(f"Created the signbridge data directory {result['dataDir']}")
    click.echo(f"  database: {result['databaseUrl']}")
    click.echo(f"  keystore: {result['keystore']}")
    if demo:
        click.echo(f"Created the organization Demo Corp ({result['organizationId']}) with project 'demo' and the")
        click.echo("signing policies release-signing, installer-signing and ecdsa-signing; CI user 'demo-ci'.")
        click.echo(f"Demo root certificate: {result['rootCertificate']}")
        click.echo("The API token is shown only now. To use it:")
        click.echo(f"  export SIGNPATH_ORGANIZATION_ID={result['organizationId']}")
        click.echo(f"  export SIGNPATH_API_TOKEN={result['apiToken']}")
        click.echo("  export SIGNPATH_API_URL=http://127.0.0.1:8443/Api   # where `signbridge server run` listens")
        click.echo(f"  export SIGNBRIDGE_ANCHORS={result['rootCertificate']}")


@server.command()
@data_dir_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True)
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate (chain) for HTTPS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key for HTTPS.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info")
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="A log line per request.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: every log line is a JSON object (access lines included); no token or PIN is ever logged.")
@click.option("--audit-log", is_flag=True, help="Also log each signing attempt once its audit record is committed.")
@click.option("--metrics-address", metavar="HOST:PORT", envvar="SIGNBRIDGE_METRICS_ADDRESS",
              help="Serve /Api/metrics and /Api/readyz on this address instead of the API's.")
@click.option(
    "--forwarded-allow-ips",
    metavar="ADDRESSES",
    help="Comma-separated proxy addresses whose X-Forwarded-For is believed (default: server.json's "
    "forwardedAllowIps, else none: the remote address is always the socket's peer).",
)
def run(
    data_dir: Path,
    database_url: str | None,
    host: str,
    port: int,
    tls_cert: str | None,
    tls_key: str | None,
    workers: int,
    log_level: str,
    access_log: bool,
    log_format: str,
    audit_log: bool,
    metrics_address: str | None,
    forwarded_allow_ips: str | None,
) -> None:
    """Run the signing service (uvicorn) until SIGTERM or Ctrl-C."""
    import uvicorn

    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    operations_address = parse_address(metrics_address) if metrics_address else None
    store = open_data_dir(data_dir, database_url=database_url)  # fails early, before workers start
    settings = store.settings
    try:
        store.ensure_checkpoint_key()  # here, before the workers start, so that they share one key
    finally:
        store.close()
    proxies = settings.forwarded_allow_ips
    if forwarded_allow_ips is not None:
        proxies = [address.strip() for address in forwarded_allow_ips.split(",") if address.strip()]
    if not tls_cert and not is_loopback_host(host):
        click.echo(f"signbridge: warning: serving plain HTTP on {host}; use --tls-cert/--tls-key", err=True)
    json_lines = log_format == "json"
    _tell_workers({
        "SIGNBRIDGE_DATA_DIR": str(data_dir.resolve()),
        "SIGNBRIDGE_DATABASE_URL": database_url or os.environ.get("SIGNBRIDGE_DATABASE_URL"),
        "SIGNBRIDGE_ACCESS_LOG": "json" if json_lines and access_log else None,
        "SIGNBRIDGE_AUDIT_LOG": "1" if audit_log else None,
        "SIGNBRIDGE_METRICS_ADDRESS": metrics_address,
    })
    with _metrics_directory(data_dir.resolve()):
        from ..server.httpprotocol import ConnectionLimits, HttpProtocol
        from ..server.jsonlog import uvicorn_log_config
        from ..server.operations import OperationsServer

        limits = ConnectionLimits(settings.header_timeout, settings.body_timeout, settings.max_connections_per_ip)
        operations = None
        if operations_address is not None:
            local = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
            operations = OperationsServer(
                operations_address, lambda: open_data_dir(data_dir, database_url=database_url),
                f"{'https' if tls_cert else 'http'}://{local}:{port}/Api/healthz",
            ).start()
            click.echo(f"signbridge metrics and readiness: {operations.url}/metrics, {operations.url}/readyz", err=True)
        scheme = "https" if tls_cert else "http"
        click.echo(f"signbridge service: {scheme}://{host}:{port}/Api ({workers} worker{'s' if workers > 1 else ''})", err=True)
        try:
            uvicorn.run(
                "signbridge.server.app:create_app_from_env",
                factory=True,
                http=functools.partial(HttpProtocol, limits=limits),
                proxy_headers=bool(proxies),
                forwarded_allow_ips=proxies or None,
                host=host,
                port=port,
                workers=workers,
                ssl_certfile=tls_cert,
                ssl_keyfile=tls_key,
                log_level=log_level,
                # In JSON the app writes the access lines itself (with the route and the duration).
                access_log=access_log and not json_lines,
                log_config=uvicorn_log_config(json_lines, log_level) if json_lines or audit_log else LOGGING_CONFIG,
                timeout_graceful_shutdown=30,
                server_header=False,
            )
        finally:
            if operations is not None:
                operations.close()


def _tell_workers(settings: dict[str, str | None]) -> None:
    """uvicorn's workers build the app from the environment (``create_app_from_env``)."""
    for name, value in settings.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def _metrics_directory(data_dir: Path) -> Iterator[None]:
    """prometheus_client's multiprocess directory, empty, named in the environment before any worker
    (or this process) imports prometheus_client: ``DATA_DIR/metrics/<pid>``, removed at the end, or
    the operator's ``PROMETHEUS_MULTIPROC_DIR``, emptied of value files first."""
    given = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if given:
        directory = Path(given)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        base = data_dir / "metrics"
        base.mkdir(mode=0o700, exist_ok=True)
        for previous in base.iterdir():
            # Left by a service that was killed: its values must not be added to ours.
            if previous.name.isdigit() and not pid_alive(int(previous.name)):
                shutil.rmtree(previous, ignore_errors=True)
        directory = base / str(os.getpid())
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700)
    os.environ[MULTIPROCESS_DIR_VARIABLE] = str(directory)
    try:
        yield
    finally:
        if not given:
            shutil.rmtree(directory, ignore_errors=True)

