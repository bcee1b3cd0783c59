"""``signbridge audit``: verifying an audit export without the service or its database."""

from __future__ import annotations

from pathlib import Path

import click

from ..crypto.certificate_files import read_certificates
from ..errors import UsageError
from ..server.audit_export import kept_checkpoints, read_export, verify_export
from .admin import report_verification


@click.group()
def audit() -> None:
    """Check audit exports offline."""


@audit.command("verify")
@click.option("--export", "export_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The export to check (`signbridge admin audit export --json --output FILE`).")
@click.option("--cert", "cert_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The checkpoint certificate you kept (`signbridge admin audit certificate`).")
@click.option("--kept", "kept_paths", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An earlier export whose checkpoints must still hold (repeatable).")
@click.option("--json", "as_json", is_flag=True)
def verify(export_path: Path, cert_path: Path, kept_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check an export's hash chain and its checkpoints against the pinned certificate; exit 1 when
    records were edited, deleted or reordered, or checkpoints forged or removed."""
    certificates = read_certificates(cert_path, error=UsageError)
    if len(certificates) != 1:
        raise UsageError(f"{cert_path} must hold exactly the checkpoint certificate")
    kept = kept_checkpoints(kept_paths)
    checked = verify_export(read_export(export_path), certificates[0], kept)
    if not checked.checkpoints and not as_json and checked.ok:
        click.echo("warning: the export holds no signed checkpoint; only the chain itself was checked", err=True)
    report_verification(checked, as_json, signed_by=certificates[0].subject.rfc4514_string())
