"""``signbridge productsign`` and ``signbridge pkgutil --check-signature``: Apple's package tools.

Both print what Apple's print and exit as Apple's do (see docs/productsign.md):

    signbridge productsign --timestamp --sign "TEAM123456" MyInstaller.pkg MyInstaller-signed.pkg
    signbridge pkgutil --check-signature MyInstaller-signed.pkg

productsign finds the identity in the running tokens (the keychain), considering installer
identities only, and exits 1 on any error. pkgutil exits 0 for a valid signature by a trusted
certificate and 1 for anything else (no signature, invalid, untrusted, expired).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..apple.certificates import DEVELOPER_ID_INSTALLER, Usage, extension_oids
from ..apple.codesig import cms_signing
from ..apple.pkg.sign import INSTALLER_IDENTITY_REQUIRED, TOC_CHECKSUMS, sign_package
from ..apple.settings import load_tool_settings
from ..crypto.certificate_files import read_certificates
from ..crypto.names import common_name
from ..errors import SignbridgeError

if TYPE_CHECKING:  # each command imports what only it needs when it runs (start-up time)
    from ..apple.pkg.verify import PackageVerdict
    from ..crypto.identity import Identity

EXIT_FAILURE = 1
DEFAULT_TIMESTAMP = "\0default"  # what a bare --timestamp becomes
_RULE = "-" * 72
_FINGERPRINT_BYTES_PER_LINE = 22


class _AppleOptions(click.Command):
    """Accepts Apple's ``--timestamp`` with no value next to ``--timestamp=URL`` and
    ``--timestamp=none``: a bare ``--timestamp`` never takes the next argument as its value."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten: list[str] = []
        for index, arg in enumerate(args):
            if arg == "--":
                rewritten.extend(args[index:])
                break
            rewritten.append(f"--timestamp={DEFAULT_TIMESTAMP}" if arg == "--timestamp" else arg)
        return super().parse_args(ctx, rewritten)


class _ProductsignFailure(SignbridgeError):
    """An error worded as Apple's productsign words it."""


# --- productsign ----------------------------------------------------------------------------------


@click.command("productsign", cls=_AppleOptions)
@click.option("--sign", "identity_name", required=True, metavar="IDENTITY",
              help="Certificate common name (or part of it, e.g. the team id), SHA-1 or SHA-256 fingerprint.")
@click.option("--timestamp", "timestamp", metavar="[=URL|=none]",
              help="Timestamp the signature (default for Developer ID identities): the configured TSA "
                   "(SIGNBRIDGE_TIMESTAMP_URL / TimestampUrl), else Apple's; =URL another; =none none.")
@click.option("--cert", "cert_files", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Embed the certificates in FILE (PEM or DER) after the identity's chain. Repeatable.")
@click.option("--keychain", "--token", "tokens", multiple=True, metavar="TOKEN",
              help="Look for the identity in this running token only (name or io.signbridge.token:NAME).")
@click.option("--toc-checksum", type=click.Choice([a.hashlib_name for a in TOC_CHECKSUMS]), default="sha1",
              show_default=True,
              help="Table-of-contents checksum: sha1 as Apple's productsign writes (any macOS); sha256 is "
                   "reported as damaged by macOS 10.11 and older.")
@click.option("--check-files/--no-check-files", default=True, show_default=True,
              help="Check every file's data against the archived checksum in the table of contents as it is "
                   "copied, before signing (one read of the data). --no-check-files lets the kernel copy it "
                   "unread: for trusted inputs too large to read.")
@click.argument("input_path", metavar="INPUT.pkg", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUTPUT.pkg", type=click.Path(path_type=Path))
@click.pass_context
def productsign(
    context: click.Context,
    identity_name: str,
    timestamp: str | None,
    cert_files: Sequence[Path],
    tokens: Sequence[str],
    toc_checksum: str,
    check_files: bool,
    input_path: Path,
    output_path: Path,
) -> None:
    """Sign a macOS installer package (product archive or component package) with an installer
    identity from the running tokens. Only the package's table-of-contents checksum (and the hash of
    the CMS signed attributes) is sent to the token; the input is never modified."""
    try:
        _productsign(identity_name, timestamp, cert_files, tokens, toc_checksum, check_files, input_path, output_path)
    except SignbridgeError as exc:
        click.echo(f"productsign: error: {exc}", err=True)
        context.exit(EXIT_FAILURE)
    except OSError as exc:  # writing the output: a full disk, a directory that went away
        click.echo(f"productsign: error: cannot write {output_path}: {exc.strerror or exc}", err=True)
        context.exit(EXIT_FAILURE)


def _productsign(
    identity_name: str,
    timestamp: str | None,
    cert_files: Sequence[Path],
    tokens: Sequence[str],
    toc_checksum: str,
    check_files: bool,
    input_path: Path,
    output_path: Path,
) -> None:
    from ..keychain.tokens import DRIVER_ID

    settings = load_tool_settings()
    identity = _select_identity(identity_name, tokens)
    extra = [certificate for path in cert_files for certificate in read_certificates(path, error=_ProductsignFailure)]
    if timestamp is None and DEVELOPER_ID_INSTALLER in extension_oids(identity.certificate):
        timestamp = DEFAULT_TIMESTAMP  # Apple timestamps Developer ID signatures unless told not to
    url = cms_signing.resolve_timestamp_url("" if timestamp == DEFAULT_TIMESTAMP else timestamp, settings.timestamp_url)

    if url is not None:
        click.echo("productsign: using timestamp authority for signature")
    click.echo(
        f'productsign: signing product with identity "{identity.common_name}" from keychain '
        f"{DRIVER_ID}:{identity.source}"
    )
    for certificate in [*identity.chain, *extra]:
        if certificate != identity.certificate:
            click.echo(f'productsign: adding certificate "{common_name(certificate)}"')
    signed = sign_package(
        input_path,
        output_path,
        identity,
        extra_certificates=extra,
        toc_checksum=toc_checksum,
        timestamp=cms_signing.timestamper(url) if url is not None else None,
        check_files=check_files,
    )
    if signed.dropped_ticket:
        click.echo(
            f"productsign: warning: the notarization ticket stapled to {input_path} was removed: it does not "
            "match the new signature. Notarize and staple the signed package again.",
            err=True,
        )
    click.echo(f"productsign: Wrote signed product archive to {output_path}")


def _select_identity(name: str, tokens: Sequence[str]) -> Identity:
    from ..keychain.selection import NoIdentityError, UnsuitableIdentityError, select_identity
    from ..keychain.tokens import find_tokens

    records = find_tokens(tokens) if tokens else None
    try:
        return select_identity(name, usage=Usage.INSTALLER, tokens=records)
    except NoIdentityError as exc:
        where = f" in keychain at “{', '.join(tokens)}”" if tokens else ""
        message = f"Could not find appropriate signing identity for “{name}”{where}."
        if isinstance(exc, UnsuitableIdentityError):
            message += f"\n{INSTALLER_IDENTITY_REQUIRED}"
        else:  # the keychain's reasons, e.g. "(... expired on ...)"
            detail = str(exc).removeprefix(f"{name}: no identity found").strip()
            message += f" {detail}" if detail else ""
        raise _ProductsignFailure(message) from None


# --- pkgutil --check-signature --------------------------------------------------------------------


@click.command("pkgutil")
@click.option("--check-signature", "package", metavar="PKG", required=True,
              type=click.Path(path_type=Path), help="Check the package's signature and print its certificates.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON, for scripts.")
@click.option("--check-files/--no-check-files", default=False, show_default=True,
              help="Also read every file's data and check it against its archived and extracted checksums. "
                   "Apple's pkgutil checks the table of contents and the signatures only; the installer checks "
                   "the data as it extracts it.")
@click.pass_context
def pkgutil(context: click.Context, package: Path, as_json: bool, check_files: bool) -> None:
    """Check the signature of a macOS installer package, as Apple's pkgutil --check-signature does.

    Trust anchors come from SIGNBRIDGE_ANCHORS or the TrustAnchors setting. Exits 0 when the package
    is signed by a trusted certificate, 1 otherwise.
    """
    from ..apple.pkg.verify import verify_package
    from ..apple.trust import anchors_from_environment

    try:
        anchors = anchors_from_environment(load_tool_settings().anchors_value)
        verdict = verify_package(package, anchors, check_files=check_files)
    except SignbridgeError as exc:
        click.echo(f"pkgutil: error: {exc}", err=True)
        context.exit(EXIT_FAILURE)
    if as_json:
        click.echo(json.dumps(verdict_json(verdict), indent=2))
    else:
        click.echo(render_check_signature(verdict), nl=False)
        if not verdict.ok:
            for problem in verdict.problems:
                click.echo(f"pkgutil: {problem}", err=True)
    context.exit(verdict.exit_code)


def render_check_signature(verdict: PackageVerdict, *, now: datetime | None = None) -> str:
    """The report in the layout of Apple's ``pkgutil --check-signature``."""
    from ..apple.pkg.verify import PackageStatus

    now = now or datetime.now(UTC)
    lines = [f'Package "{verdict.path.name}":', f"   Status: {verdict.status_text}"]
    if verdict.ok and verdict.stapled_ticket:
        lines.append("   Notarization: trusted by the Apple notary service")
    if verdict.timestamp is not None:
        lines.append(f"   Signed with a trusted timestamp on: {_date(verdict.timestamp)}")
    if verdict.chain and verdict.status in (PackageStatus.TRUSTED, PackageStatus.UNTRUSTED, PackageStatus.EXPIRED):
        lines.append("   Certificate Chain:")
        for number, certificate in enumerate(verdict.chain, start=1):
            if number > 1:
                lines.append(f"       {_RULE}")
            lines.append(f"    {number}. {common_name(certificate)}")
            if certificate.not_valid_after_utc >= now:  # Apple leaves the line out once it has passed
                lines.append(f"       Expires: {_date(certificate.not_valid_after_utc)}")
            lines.append("       SHA256 Fingerprint:")
            fingerprint = certificate.fingerprint(hashes.SHA256()).hex().upper()
            pairs = [fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)]
            for start in range(0, len(pairs), _FINGERPRINT_BYTES_PER_LINE):
                lines.append("           " + " ".join(pairs[start : start + _FINGERPRINT_BYTES_PER_LINE]))
    return "\n".join(lines) + "\n"


def verdict_json(verdict: PackageVerdict) -> dict[str, Any]:
    """The verdict as plain data (``pkgutil --check-signature --json``)."""
    return {
        "package": str(verdict.path),
        "status": verdict.status_text,
        "result": verdict.status.name.lower(),
        "trusted": verdict.ok,
        "exitCode": verdict.exit_code,
        "notarizationTicketStapled": verdict.stapled_ticket,
        "notarizationTicketIssued": _iso(verdict.ticket_issued),
        "tocChecksum": verdict.checksum_algorithm.hashlib_name if verdict.checksum_algorithm else None,
        "signatures": list(verdict.signatures),
        "rsaSignatureOver": verdict.rsa_form,
        "cmsSignedAttributes": verdict.cms_signed_attributes,
        "signingTime": _iso(verdict.signing_time),
        "trustedTimestamp": _iso(verdict.timestamp),
        "anchor": verdict.trust.anchor_subject if verdict.trust is not None and verdict.trust.anchor else None,
        "certificates": [_certificate_json(certificate) for certificate in verdict.chain],
        "problems": list(verdict.problems),
    }


def _certificate_json(certificate: x509.Certificate) -> dict[str, Any]:
    return {
        "commonName": common_name(certificate),
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serialNumber": format(certificate.serial_number, "X"),
        "notBefore": _iso(certificate.not_valid_before_utc),
        "expires": _iso(certificate.not_valid_after_utc),
        "sha256": certificate.fingerprint(hashes.SHA256()).hex().upper(),
        "sha1": certificate.fingerprint(hashes.SHA1()).hex().upper(),  # noqa: S324 - an identifier, as Apple's
    }


def _date(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S +0000")


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).isoformat() if when is not None else None
