"""Loading the token's identities from the signing service.

``Cryptoki/MySigningPolicies`` lists the policies the API token's user may sign with (filtered by
project and policy slug when given). Each becomes a certificate, a public key and a private key
sharing ``CKA_ID``/``CKA_LABEL`` = ``$ProjectSlug/$SigningPolicySlug``; the issuer chain (the
service's ``certificateChain`` field, when present) becomes authority certificate objects.

A certificate used by more than one loaded policy is an "ambiguous reference", as in SignPath's
macOS provider: a tool that picks an identity by its certificate could not tell which policy to
sign with. The error names the policies and the filter that loads only one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..api.client import ApiError, ServiceClient, ServiceUnavailable, SigningPolicyInfo, TlsVerificationError
from ..crypto.names import common_name
from ..errors import ConfigError, SignbridgeError
from ..pkcs11 import TokenObject, authority_object, objects_for_identity

log = logging.getLogger("signbridge.token")


class LoadError(SignbridgeError):
    """The token cannot start: the one line ``signbridge start`` prints."""


class AmbiguousReference(LoadError):
    """A certificate is referenced by more than one loaded signing policy."""

    exit_code = 2


@dataclass(frozen=True)
class LoadedIdentities:
    policies: tuple[SigningPolicyInfo, ...]
    objects: tuple[TokenObject, ...]
    skipped: tuple[str, ...]  # why some policies were left out (unsupported keys)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(policy.key_id for policy in self.policies)


def fetch_policies(
    client: ServiceClient, project_slug: str | None, signing_policy_slug: str | None
) -> list[SigningPolicyInfo]:
    """The policies to serve; failures become a :class:`LoadError` that says why in one line."""
    try:
        policies = client.my_signing_policies(project_slug, signing_policy_slug)
    except (ServiceUnavailable, TlsVerificationError) as exc:
        raise LoadError(str(exc)) from None
    except ApiError as exc:
        raise LoadError(_explain(exc, client, project_slug, signing_policy_slug)) from None
    if not policies:
        raise LoadError(_nothing_to_load(client, project_slug, signing_policy_slug))
    check_unambiguous(policies, project_slug, signing_policy_slug)
    return policies


def _explain(exc: ApiError, client: ServiceClient, project: str | None, policy: str | None) -> str:
    detail = exc.detail
    where = f"the signing service at {client.api_url}"
    if exc.status == 401:
        return f"{where} rejected the API token (HTTP 401: {detail})"
    if exc.status == 403:
        return f"{where} refused access to organization {client.organization_id} (HTTP 403: {detail})"
    if exc.status == 404:
        filters = _filters(project, policy) or "the organization id"
        return f"unknown project or signing policy: {detail} (check {filters})"
    if exc.status is not None:
        return f"{where} answered HTTP {exc.status}: {detail}"
    return f"{where} sent an unusable answer: {exc}"


def _filters(project: str | None, policy: str | None) -> str:
    given = []
    if project:
        given.append(f"--project-slug {project}")
    if policy:
        given.append(f"--signing-policy-slug {policy}")
    return " and ".join(given)


def _nothing_to_load(client: ServiceClient, project: str | None, policy: str | None) -> str:
    scope = f"organization {client.organization_id}"
    if project:
        scope = f"project {project} of {scope}"
    if policy:
        scope = f"signing policy {policy} in {scope}"
    return (
        f"no certificates to load: the API token's user is not a submitter on any signing policy of {scope}"
        if not policy
        else f"no certificates to load: the API token's user is not a submitter on {scope}"
    )


def check_unambiguous(
    policies: Sequence[SigningPolicyInfo], project_slug: str | None, signing_policy_slug: str | None
) -> None:
    """Raise :class:`AmbiguousReference` when two loaded policies use the same certificate."""
    by_certificate: dict[bytes, list[SigningPolicyInfo]] = {}
    for policy in policies:
        by_certificate.setdefault(policy.certificate.fingerprint(hashes.SHA256()), []).append(policy)
    groups = [group for group in by_certificate.values() if len(group) > 1]
    if not groups:
        return
    group = groups[0]
    certificate = group[0].certificate
    sha1 = certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S324 - an identifier, as Apple's
    names = ", ".join(policy.key_id for policy in group)
    choices = " or ".join(_isolating_filter(policy, group, project_slug) for policy in group)
    more = f" ({len(groups) - 1} more certificate(s) are shared too)" if len(groups) > 1 else ""
    raise AmbiguousReference(
        f'ambiguous reference: the certificate "{common_name(certificate)}" (SHA-1 {sha1}) is used by '
        f"the signing policies {names}; load one of them with {choices}{more}"
    )


def _isolating_filter(policy: SigningPolicyInfo, group: Sequence[SigningPolicyInfo], project: str | None) -> str:
    same_project = [other for other in group if other.project_slug == policy.project_slug]
    same_slug = [other for other in group if other.signing_policy_slug == policy.signing_policy_slug]
    if len(same_project) == 1 and project is None:
        return f"--project-slug {policy.project_slug}"
    if len(same_slug) == 1:
        return f"--signing-policy-slug {policy.signing_policy_slug}"
    return f"--project-slug {policy.project_slug} --signing-policy-slug {policy.signing_policy_slug}"


def build_objects(policies: Sequence[SigningPolicyInfo]) -> LoadedIdentities:
    """The token's objects: three per usable policy, then each distinct issuer certificate once."""
    objects: list[TokenObject] = []
    served: list[SigningPolicyInfo] = []
    skipped: list[str] = []
    authorities: dict[bytes, x509.Certificate] = {}
    for policy in policies:
        try:
            objects.extend(objects_for_identity(policy.certificate, policy.key_id, policy.key_id))
        except ConfigError as exc:
            skipped.append(f"{policy.key_id}: {exc}")
            log.warning("not serving %s: %s", policy.key_id, exc)
            continue
        served.append(policy)
        for issuer in policy.chain:
            authorities.setdefault(issuer.fingerprint(hashes.SHA256()), issuer)
    if not served:
        raise LoadError("no usable certificates: " + "; ".join(skipped))
    objects.extend(authority_object(issuer) for issuer in authorities.values())
    return LoadedIdentities(tuple(served), tuple(objects), tuple(skipped))


def load_identities(
    client: ServiceClient, project_slug: str | None, signing_policy_slug: str | None
) -> LoadedIdentities:
    """Fetch the policies and build the token's objects (see the module docstring)."""
    return build_objects(fetch_policies(client, project_slug, signing_policy_slug))
