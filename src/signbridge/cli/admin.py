"""``signbridge admin``: organizations, projects, keys, policies, users, groups, tokens, audit."""

from __future__ import annotations

import datetime as dt
from functools import update_wrapper
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.orm import Session

from ..atomic import atomic_output, write_atomically
from ..crypto.certificate_files import read_certificates
from ..errors import UsageError
from ..server import audit as audit_log
from ..server import directory
from ..server.audit_export import CheckedLog, export_lines, kept_checkpoints, verify_database
from ..server.checkpoints import (
    CheckpointSigner,
    checkpoint_key_certificate,
    ensure_checkpoint_key,
    write_checkpoint,
)
from ..server.datadir import DataDir, open_data_dir
from ..server.keystores import KeySpec
from ..server.models import Organization
from ..server.timestamp_authority import load_timestamp_authority
from .common import F, data_dir_option, print_json, print_table


class StoreLocation:
    """Where the data directory is. The group's options give the default; a subcommand's own
    ``--data-dir``/``--database-url`` override it, so both orders work. Opened on first use."""

    def __init__(self, data_dir: Path, database_url: str | None) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self._store: DataDir | None = None

    def open(self, context: click.Context) -> DataDir:
        if self._store is None:
            self._store = open_data_dir(self.data_dir, database_url=self.database_url)
            context.find_root().call_on_close(self._store.close)
        return self._store


def pass_store(function: F) -> F:
    @click.pass_context
    def wrapper(context: click.Context, /, *args: Any, **kwargs: Any) -> Any:
        return context.invoke(function, context.find_object(StoreLocation).open(context), *args, **kwargs)

    return update_wrapper(wrapper, function)  # type: ignore[return-value]


def _override_data_dir(context: click.Context, _parameter: click.Parameter, value: Path | None) -> None:
    if value is not None:
        context.find_object(StoreLocation).data_dir = value


def _override_database_url(context: click.Context, _parameter: click.Parameter, value: str | None) -> None:
    if value is not None:
        context.find_object(StoreLocation).database_url = value


def _subcommand_location_options() -> list[click.Option]:
    return [
        click.Option(["--data-dir"], type=click.Path(file_okay=False, path_type=Path), expose_value=False,
                     is_eager=True, callback=_override_data_dir, help="The service's data directory."),
        click.Option(["--database-url"], expose_value=False, is_eager=True, callback=_override_database_url,
                     help="SQLAlchemy URL of the database (default: SQLite in the data directory)."),
    ]


@click.group()
@data_dir_option
@click.pass_context
def admin(context: click.Context, data_dir: Path, database_url: str | None) -> None:
    """Administer the signing service's data directory."""
    context.obj = StoreLocation(data_dir, database_url)


org_option = click.option(
    "--org", "org_ref", metavar="ID|NAME", help="Organization (id or name); optional when there is only one."
)


def _organization(session: Session, ref: str | None) -> Organization:
    if ref:
        return directory.get_organization(session, ref)
    organizations = directory.list_organizations(session)
    if len(organizations) != 1:
        raise UsageError("there are several organizations; choose one with --org" if organizations else "there is no organization yet")
    return organizations[0]


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


# Organizations


@admin.group()
def org() -> None:
    """Organizations."""


@org.command("create")
@click.argument("name")
@pass_store
def org_create(store: DataDir, name: str) -> None:
    with store.session() as session:
        organization = directory.create_organization(session, name)
        click.echo(f"Created organization {name!r} with id {organization.id}")


@org.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_store
def org_list(store: DataDir, as_json: bool) -> None:
    with store.session() as session:
        rows = [{"id": o.id, "name": o.name} for o in directory.list_organizations(session)]
    print_json(rows) if as_json else print_table(["ID", "NAME"], [(r["id"], r["name"]) for r in rows])


# Projects


@admin.group()
def project() -> None:
    """Projects."""


@project.command("create")
@org_option
@click.argument("slug")
@click.option("--name")
@pass_store
def project_create(store: DataDir, org_ref: str | None, slug: str, name: str | None) -> None:
    with store.session() as session:
        directory.create_project(session, _organization(session, org_ref), slug, name)
    click.echo(f"Created project {slug!r}")


@project.command("list")
@org_option
@click.option("--json", "as_json", is_flag=True)
@pass_store
def project_list(store: DataDir, org_ref: str | None, as_json: bool) -> None:
    with store.session() as session:
        rows = [{"slug": p.slug, "name": p.name} for p in directory.list_projects(session, _organization(session, org_ref))]
    print_json(rows) if as_json else print_table(["SLUG", "NAME"], [(r["slug"], r["name"]) for r in rows])


# Certificates and keys


@admin.group()
def cert() -> None:
    """Keys and their certificates."""


@cert.command("generate")
@org_option
@click.argument("slug")
@click.option("--key-type", default="rsa-2048", show_default=True, help="rsa-2048, rsa-3072, rsa-4096, ecdsa-p256, ecdsa-p384")
@click.option("--subject", required=True, help='Subject, RFC 4514: "CN=Build Signing,O=Example Corp"')
@click.option("--csr", "csr_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a CSR (PEM) here instead of self-signing.")
@click.option("--days", type=click.IntRange(1, 36500), default=365, show_default=True, help="Validity of a self-signed certificate.")
@pass_store
def cert_generate(store: DataDir, org_ref: str | None, slug: str, key_type: str, subject: str, csr_out: Path | None, days: int) -> None:
    """Generate a key in the keystore, with a self-signed certificate or a CSR."""
    spec = KeySpec.parse(key_type)
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except ValueError as exc:
        raise UsageError(f"--subject {subject!r} is not an RFC 4514 name: {exc}") from None
    with store.session() as session:
        issued = directory.generate_key(
            session, store.keystore, _organization(session, org_ref), slug, spec, name,
            self_signed_days=None if csr_out else days,
        )
        if csr_out:
            write_atomically(csr_out, (issued.csr_pem or "").encode(), mode=None)
            click.echo(f"Generated a {spec.label} key {slug!r}; its CSR is in {csr_out}. Import the issued certificate with `signbridge admin cert import`.")
        else:
            click.echo(f"Generated a {spec.label} key {slug!r} with a self-signed certificate (SHA-256 {issued.certificate.sha256}).")


@cert.command("import")
@org_option
@click.argument("slug")
@click.argument("certificate", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chain", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="PEM file with the issuer chain.")
@pass_store
def cert_import(store: DataDir, org_ref: str | None, slug: str, certificate: Path, chain: Path | None) -> None:
    """Attach the certificate issued for a key's CSR (PEM or DER; extra PEM certificates are the chain)."""
    leaf, *rest = read_certificates(certificate, error=UsageError)
    pool = rest + (read_certificates(chain, error=UsageError) if chain else [])
    with store.session() as session:
        row = directory.get_certificate(session, _organization(session, org_ref), slug)
        directory.import_certificate(session, store.keystore, row, leaf, pool)
        click.echo(f"Imported {leaf.subject.rfc4514_string()} for {slug!r} with {len(row.chain)} issuer certificate(s).")


@cert.command("list")
@org_option
@click.option("--json", "as_json", is_flag=True)
@pass_store
def cert_list(store: DataDir, org_ref: str | None, as_json: bool) -> None:
    with store.session() as session:
        rows = []
        for row in directory.list_certificates(session, _organization(session, org_ref)):
            subject = directory.load_x509(row).subject.rfc4514_string() if row.der else "(awaiting certificate)"
            rows.append({"slug": row.slug, "keyType": row.key_spec, "purpose": row.purpose, "subject": subject, "sha256": row.sha256})
    if as_json:
        print_json(rows)
    else:
        print_table(["SLUG", "KEY", "PURPOSE", "SUBJECT"], [(r["slug"], r["keyType"], r["purpose"], r["subject"]) for r in rows])


@cert.command("show")
@org_option
@click.argument("slug")
@click.option("--chain", "with_chain", is_flag=True, help="Also print the issuer chain.")
@pass_store
def cert_show(store: DataDir, org_ref: str | None, slug: str, with_chain: bool) -> None:
    """Print a certificate as PEM."""
    with store.session() as session:
        row = directory.get_certificate(session, _organization(session, org_ref), slug)
        click.echo(_pem(directory.load_x509(row)), nl=False)
        if with_chain:
            for issuer in directory.load_chain(row):
                click.echo(_pem(issuer), nl=False)


# Policies


@admin.group()
def policy() -> None:
    """Signing policies."""


@policy.command("create")
@org_option
@click.option("--project", "project_slug", required=True)
@click.option("--certificate", "certificate_slug", required=True, help="Slug of the key/certificate the policy signs with.")
@click.option("--name")
@click.argument("slug")
@pass_store
def policy_create(store: DataDir, org_ref: str | None, project_slug: str, certificate_slug: str, name: str | None, slug: str) -> None:
    with store.session() as session:
        organization = _organization(session, org_ref)
        created = directory.create_policy(
            session,
            directory.get_project(session, organization, project_slug),
            slug,
            directory.get_certificate(session, organization, certificate_slug),
            name,
        )
        click.echo(f"Created signing policy {project_slug}/{slug} with id {created.id}")


@policy.command("list")
@org_option
@click.option("--json", "as_json", is_flag=True)
@pass_store
def policy_list(store: DataDir, org_ref: str | None, as_json: bool) -> None:
    with store.session() as session:
        rows = [
            {
                "id": p.id,
                "project": p.project.slug,
                "slug": p.slug,
                "certificate": p.certificate.slug,
                "submitters": directory.list_submitters(session, p),
            }
            for p in directory.list_policies(session, _organization(session, org_ref))
        ]
    if as_json:
        print_json(rows)
    else:
        print_table(
            ["ID", "PROJECT", "POLICY", "CERTIFICATE", "SUBMITTERS"],
            [(r["id"], r["project"], r["slug"], r["certificate"], ", ".join(r["submitters"])) for r in rows],
        )


# Users, groups, submitters


@admin.group()
def user() -> None:
    """Users (CI users sign with API tokens only)."""


@user.command("create")
@org_option
@click.argument("name")
@click.option("--interactive", is_flag=True, help="An interactive user instead of a CI user.")
@pass_store
def user_create(store: DataDir, org_ref: str | None, name: str, interactive: bool) -> None:
    with store.session() as session:
        directory.create_user(session, _organization(session, org_ref), name, "interactive" if interactive else "ci")
    click.echo(f"Created {'interactive' if interactive else 'CI'} user {name!r}")


@user.command("list")
@org_option
@click.option("--json", "as_json", is_flag=True)
@pass_store
def user_list(store: DataDir, org_ref: str | None, as_json: bool) -> None:
    with store.session() as session:
        rows = [{"id": u.id, "name": u.name, "kind": u.kind} for u in directory.list_users(session, _organization(session, org_ref))]
    print_json(rows) if as_json else print_table(["ID", "NAME", "KIND"], [(r["id"], r["name"], r["kind"]) for r in rows])


@admin.group()
def group() -> None:
    """Groups of users."""


@group.command("create")
@org_option
@click.argument("name")
@pass_store
def group_create(store: DataDir, org_ref: str | None, name: str) -> None:
    with store.session() as session:
        directory.create_group(session, _organization(session, org_ref), name)
    click.echo(f"Created group {name!r}")


@group.command("add-member")
@org_option
@click.argument("group_name")
@click.argument("user_name")
@pass_store
def group_add_member(store: DataDir, org_ref: str | None, group_name: str, user_name: str) -> None:
    with store.session() as session:
        organization = _organization(session, org_ref)
        directory.add_group_member(
            session, directory.get_group(session, organization, group_name), directory.get_user(session, organization, user_name)
        )
    click.echo(f"Added {user_name!r} to group {group_name!r}")


@admin.group()
def submitter() -> None:
    """Who may submit signing requests on a policy."""


def _submitter_args(function):  # noqa: ANN001, ANN202
    for decorator in reversed(
        [
            org_option,
            click.option("--project", "project_slug", required=True),
            click.option("--policy", "policy_slug", required=True),
            click.option("--user", "user_name"),
            click.option("--group", "group_name"),
            pass_store,
        ]
    ):
        function = decorator(function)
    return function


def _resolve_submitter(session: Session, org_ref, project_slug, policy_slug, user_name, group_name):  # noqa: ANN001, ANN202
    if bool(user_name) == bool(group_name):
        raise UsageError("name exactly one of --user or --group")
    organization = _organization(session, org_ref)
    found = directory.get_policy(session, directory.get_project(session, organization, project_slug), policy_slug)
    who = {"user": directory.get_user(session, organization, user_name)} if user_name else {
        "group": directory.get_group(session, organization, group_name)
    }
    return found, who


@submitter.command("add")
@_submitter_args
def submitter_add(store: DataDir, org_ref, project_slug, policy_slug, user_name, group_name) -> None:  # noqa: ANN001
    with store.session() as session:
        found, who = _resolve_submitter(session, org_ref, project_slug, policy_slug, user_name, group_name)
        directory.add_submitter(session, found, **who)
    click.echo(f"{user_name or group_name!r} may now submit to {project_slug}/{policy_slug}")


@submitter.command("remove")
@_submitter_args
def submitter_remove(store: DataDir, org_ref, project_slug, policy_slug, user_name, group_name) -> None:  # noqa: ANN001
    with store.session() as session:
        found, who = _resolve_submitter(session, org_ref, project_slug, policy_slug, user_name, group_name)
        directory.remove_submitter(session, found, **who)
    click.echo(f"{user_name or group_name!r} may no longer submit to {project_slug}/{policy_slug}")


# Tokens


@admin.group()
def token() -> None:
    """API tokens (shown once, stored only as a hash)."""


@token.command("create")
@org_option
@click.argument("user_name")
@click.option("--description", default="")
@click.option("--expires-in-days", type=click.IntRange(1, 3650))
@click.option("--json", "as_json", is_flag=True)
@pass_store
def token_create(store: DataDir, org_ref: str | None, user_name: str, description: str, expires_in_days: int | None, as_json: bool) -> None:
    """Create an API token for a user and print it (the only time it is shown)."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_in_days) if expires_in_days else None
    with store.session() as session:
        organization = _organization(session, org_ref)
        new = directory.create_token(session, directory.get_user(session, organization, user_name), description=description, expires_at=expires)
        org_id = organization.id
    if as_json:
        print_json({"tokenId": new.token_id, "apiToken": new.value, "organizationId": org_id, "expiresAt": expires})
    else:
        click.echo(f"API token {new.token_id} for {user_name!r} (shown only now):")
        click.echo(new.value)


@token.command("revoke")
@click.argument("token_id")
@pass_store
def token_revoke(store: DataDir, token_id: str) -> None:
    with store.session() as session:
        directory.revoke_token(session, token_id)
    click.echo(f"Revoked API token {token_id}")


@token.command("list")
@org_option
@click.argument("user_name")
@click.option("--json", "as_json", is_flag=True)
@pass_store
def token_list(store: DataDir, org_ref: str | None, user_name: str, as_json: bool) -> None:
    with store.session() as session:
        found = directory.get_user(session, _organization(session, org_ref), user_name)
        rows = [
            {"id": t.id, "description": t.description, "created": t.created_at, "expires": t.expires_at, "revoked": t.revoked_at}
            for t in directory.list_tokens(session, found)
        ]
    if as_json:
        print_json(rows)
    else:
        print_table(["ID", "DESCRIPTION", "CREATED", "EXPIRES", "REVOKED"], [tuple(r.values()) for r in rows])


# Audit


@admin.group()
def audit() -> None:
    """The tamper-evident audit log of signing attempts."""


@audit.command("list")
@click.option("--since", type=int, default=0, help="Only records after this sequence number.")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@pass_store
def audit_list(store: DataDir, since: int, limit: int, as_json: bool) -> None:
    rows = list(audit_log.iter_records(store.engine, since=since, limit=limit))
    if as_json:
        print_json(rows)
        return
    print_table(
        ["SEQ", "TIME", "USER", "POLICY", "ALGORITHM", "OUTCOME", "STATUS"],
        [
            (r["seq"], r["time"], r["user_name"] or "-", f"{r['project_slug'] or '-'}/{r['policy_slug'] or '-'}", r["algorithm"] or "-", r["outcome"], r["status"])
            for r in rows
        ],
    )


@audit.command("export")
@click.option("--json", "as_json", is_flag=True, required=True, help="Export as JSON lines (one record per line).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file instead of stdout.")
@pass_store
def audit_export(store: DataDir, as_json: bool, output: Path | None) -> None:
    """Export every record, with its chain hashes and the signed checkpoints, as JSON lines."""
    lines = export_lines(store.engine)
    if output is None:
        for line in lines:
            click.echo(line, nl=False)
        return
    with atomic_output(output, None, suffix=".tmp") as handle:
        for line in lines:
            handle.write(line.encode())


def report_verification(checked: CheckedLog, as_json: bool, *, signed_by: str | None) -> None:
    """Print a verification's outcome as ``audit verify`` does; exit 1 when the log was tampered with."""
    result = checked.result
    if as_json:
        print_json(checked.summary())
    elif result.ok:
        click.echo(f"audit log intact: {result.records} records, chain verified")
        if checked.newest is not None:
            click.echo(
                f"{checked.checkpoints} signed checkpoint(s); the newest covers record {checked.newest.seq} "
                f"({checked.newest.time}), signed by {signed_by}"
            )
        else:
            click.echo("no signed checkpoint yet: records can be checked only against each other")
    else:
        for problem in result.problems:
            click.echo(f"audit: {problem}", err=True)
        click.echo(f"audit log TAMPERED: {len(result.problems)} problem(s) in {result.records} records", err=True)
    if not result.ok:
        raise click.exceptions.Exit(1)


@audit.command("verify")
@click.option("--kept", "kept_paths", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="An earlier export whose checkpoints must still hold (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@pass_store
def audit_verify(store: DataDir, kept_paths: tuple[Path, ...], as_json: bool) -> None:
    """Check the hash chain and the signed checkpoints; exit 1 naming every edited, deleted or reordered record."""
    kept = kept_checkpoints(kept_paths)
    with store.session() as session:
        certificate = checkpoint_key_certificate(session, store.keystore)
    if certificate is None:
        checked = CheckedLog(audit_log.verify(store.engine), 0, None)
    else:
        checked = verify_database(store.engine, certificate, kept)
    report_verification(checked, as_json, signed_by=certificate and certificate.subject.rfc4514_string())


@audit.command("checkpoint")
@pass_store
def audit_checkpoint(store: DataDir) -> None:
    """Sign a checkpoint of the chain's head now (the service also does so on its own)."""
    with store.session() as session:
        row = ensure_checkpoint_key(session, store.keystore)
        signer = CheckpointSigner(row, store.keystore, load_timestamp_authority(session, store.keystore))
    checkpoint = write_checkpoint(store.engine, signer)
    if checkpoint is None:
        click.echo("the newest record is already covered by a checkpoint")
    else:
        click.echo(f"signed a checkpoint of record {checkpoint.seq} ({checkpoint.time})")


@audit.command("certificate")
@pass_store
def audit_certificate(store: DataDir) -> None:
    """Print the checkpoint certificate (PEM): keep it to verify exports offline."""
    with store.session() as session:
        certificate = checkpoint_key_certificate(session, store.keystore)
    if certificate is None:
        raise UsageError("this service has no checkpoint key yet; `signbridge server run` creates it")
    click.echo(_pem(certificate), nl=False)


def _add_location_options(group: click.Group) -> None:
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _add_location_options(command)
        else:
            command.params.extend(_subcommand_location_options())


_add_location_options(admin)
