"""Administration of organizations, projects, policies, certificates, users, groups and tokens."""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..crypto.chains import build_chain, unique_certificates
from ..errors import AlreadyExistsError, NotFoundError, UsageError
from . import pki, tokens
from .keystores import KeyRef, KeySpec, Keystore
from .models import (
    ApiToken,
    Certificate,
    Group,
    GroupMember,
    Organization,
    Project,
    SigningPolicy,
    Submitter,
    User,
    utcnow,
)

_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_slug(slug: str, what: str) -> str:
    if not _SLUG.match(slug):
        raise UsageError(f"{what} {slug!r} is not a valid slug (letters, digits, '.', '_', '-'; at most 100)")
    return slug


def _add(session: Session, obj: object, what: str) -> None:
    session.add(obj)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise AlreadyExistsError(f"{what} already exists") from None


# Organizations and projects


def create_organization(session: Session, name: str) -> Organization:
    organization = Organization(name=name)
    _add(session, organization, f"organization {name!r}")
    return organization


def get_organization(session: Session, ref: str) -> Organization:
    """By id or by name."""
    organization = session.get(Organization, ref.lower()) or session.scalar(
        select(Organization).where(Organization.name == ref)
    )
    if organization is None:
        raise NotFoundError(f"no organization {ref!r}")
    return organization


def list_organizations(session: Session) -> Sequence[Organization]:
    return session.scalars(select(Organization).order_by(Organization.name)).all()


def create_project(session: Session, organization: Organization, slug: str, name: str | None = None) -> Project:
    project = Project(organization_id=organization.id, slug=check_slug(slug, "project slug"), name=name or slug)
    _add(session, project, f"project {slug!r}")
    return project


def get_project(session: Session, organization: Organization, slug: str) -> Project:
    project = session.scalar(
        select(Project).where(Project.organization_id == organization.id, Project.slug == slug)
    )
    if project is None:
        raise NotFoundError(f"no project {slug!r} in organization {organization.name!r}")
    return project


def list_projects(session: Session, organization: Organization) -> Sequence[Project]:
    return session.scalars(
        select(Project).where(Project.organization_id == organization.id).order_by(Project.slug)
    ).all()


# Certificates and keys


@dataclass(frozen=True)
class IssuedKey:
    certificate: Certificate
    csr_pem: str | None = None


def certificate_columns(certificate: x509.Certificate, chain: Sequence[x509.Certificate]) -> dict:
    """The ``Certificate`` row values that describe an issued certificate and its issuer chain."""
    return {
        "der": certificate.public_bytes(serialization.Encoding.DER),
        "chain": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain],
        "sha256": pki.fingerprint(certificate),
    }


def add_certificate(
    session: Session,
    *,
    organization: Organization | None,
    slug: str,
    key_ref: KeyRef,
    key_spec: KeySpec,
    certificate: x509.Certificate | None,
    chain: Sequence[x509.Certificate] = (),
    purpose: str = "signing",
) -> Certificate:
    row = Certificate(
        organization_id=organization.id if organization else None,
        slug=check_slug(slug, "certificate slug"),
        key_ref=str(key_ref),
        key_spec=key_spec.label,
        purpose=purpose,
        chain=[],
    )
    if certificate is not None:
        for name, value in certificate_columns(certificate, chain).items():
            setattr(row, name, value)
    _add(session, row, f"certificate {slug!r}")
    return row


def generate_key(
    session: Session,
    keystore: Keystore,
    organization: Organization,
    slug: str,
    spec: KeySpec,
    subject: x509.Name,
    *,
    self_signed_days: int | None = 365,
) -> IssuedKey:
    """Generate a key in the keystore with a self-signed certificate, or (``self_signed_days=None``) a CSR."""
    existing = session.scalar(
        select(Certificate).where(Certificate.organization_id == organization.id, Certificate.slug == slug)
    )
    if existing is not None:
        raise AlreadyExistsError(f"certificate {slug!r} already exists")
    ref = keystore.generate(spec, f"{organization.name}/{slug}")
    public_key = keystore.public_key(ref)

    def sign(request):  # noqa: ANN001, ANN202
        return keystore.sign(ref, request)

    if self_signed_days is None:
        csr = pki.build_csr(subject, public_key, sign)
        row = add_certificate(
            session, organization=organization, slug=slug, key_ref=ref, key_spec=spec, certificate=None
        )
        return IssuedKey(row, csr.public_bytes(serialization.Encoding.PEM).decode())
    certificate = pki.issue_certificate(
        subject=subject,
        subject_public_key=public_key,
        issuer=None,
        issuer_public_key=public_key,
        sign=sign,
        extensions=[
            pki.Extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
            pki.Extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            ),
        ],
        days=self_signed_days,
    )
    row = add_certificate(
        session, organization=organization, slug=slug, key_ref=ref, key_spec=spec, certificate=certificate
    )
    return IssuedKey(row)


def import_certificate(
    session: Session,
    keystore: Keystore,
    row: Certificate,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
) -> Certificate:
    """Attach an issued certificate (and its issuer chain) to a key generated with a CSR."""
    public_key = keystore.public_key(KeyRef.parse(row.key_ref))
    if certificate.public_key() != public_key:
        raise UsageError(f"the certificate's public key is not the key of {row.slug!r}")
    ordered = build_chain(certificate, chain)
    remaining = [c for c in unique_certificates(chain) if c != certificate and c not in ordered]
    if remaining:
        extra = ", ".join(c.subject.rfc4514_string() for c in remaining)
        raise UsageError(
            f"these certificates are not in the chain of {certificate.subject.rfc4514_string()}: {extra}"
        )
    for name, value in certificate_columns(certificate, ordered).items():
        setattr(row, name, value)
    session.flush()
    return row


def get_certificate(session: Session, organization: Organization, slug: str) -> Certificate:
    row = session.scalar(
        select(Certificate).where(Certificate.organization_id == organization.id, Certificate.slug == slug)
    )
    if row is None:
        raise NotFoundError(f"no certificate {slug!r} in organization {organization.name!r}")
    return row


def list_certificates(session: Session, organization: Organization) -> Sequence[Certificate]:
    return session.scalars(
        select(Certificate).where(Certificate.organization_id == organization.id).order_by(Certificate.slug)
    ).all()


def load_x509(row: Certificate) -> x509.Certificate:
    if row.der is None:
        raise UsageError(f"certificate {row.slug!r} has a key but no issued certificate yet (import one)")
    return x509.load_der_x509_certificate(row.der)


def load_chain(row: Certificate) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(base64.b64decode(item)) for item in row.chain]


# Signing policies


def create_policy(
    session: Session, project: Project, slug: str, certificate: Certificate, name: str | None = None
) -> SigningPolicy:
    if certificate.der is None:
        raise UsageError(f"certificate {certificate.slug!r} has no issued certificate yet")
    policy = SigningPolicy(
        project_id=project.id, slug=check_slug(slug, "policy slug"), name=name or slug, certificate_id=certificate.id
    )
    _add(session, policy, f"signing policy {slug!r} in project {project.slug!r}")
    return policy


def get_policy(session: Session, project: Project, slug: str) -> SigningPolicy:
    policy = session.scalar(
        select(SigningPolicy).where(SigningPolicy.project_id == project.id, SigningPolicy.slug == slug)
    )
    if policy is None:
        raise NotFoundError(f"no signing policy {slug!r} in project {project.slug!r}")
    return policy


def list_policies(session: Session, organization: Organization) -> Sequence[SigningPolicy]:
    return session.scalars(
        select(SigningPolicy)
        .join(Project)
        .where(Project.organization_id == organization.id)
        .order_by(Project.slug, SigningPolicy.slug)
    ).all()


# Users, groups, submitters


def create_user(session: Session, organization: Organization, name: str, kind: str = "ci") -> User:
    if kind not in ("ci", "interactive"):
        raise UsageError(f"a user is 'ci' or 'interactive', not {kind!r}")
    user = User(organization_id=organization.id, name=name, kind=kind)
    _add(session, user, f"user {name!r}")
    return user


def get_user(session: Session, organization: Organization, name: str) -> User:
    user = session.scalar(select(User).where(User.organization_id == organization.id, User.name == name))
    if user is None:
        raise NotFoundError(f"no user {name!r} in organization {organization.name!r}")
    return user


def list_users(session: Session, organization: Organization) -> Sequence[User]:
    return session.scalars(select(User).where(User.organization_id == organization.id).order_by(User.name)).all()


def create_group(session: Session, organization: Organization, name: str) -> Group:
    group = Group(organization_id=organization.id, name=name)
    _add(session, group, f"group {name!r}")
    return group


def get_group(session: Session, organization: Organization, name: str) -> Group:
    group = session.scalar(select(Group).where(Group.organization_id == organization.id, Group.name == name))
    if group is None:
        raise NotFoundError(f"no group {name!r} in organization {organization.name!r}")
    return group


def add_group_member(session: Session, group: Group, user: User) -> None:
    _add(session, GroupMember(group_id=group.id, user_id=user.id), f"{user.name!r} in group {group.name!r}")


def add_submitter(session: Session, policy: SigningPolicy, *, user: User | None = None, group: Group | None = None) -> None:
    if (user is None) == (group is None):
        raise UsageError("a submitter is a user or a group")
    who = f"user {user.name!r}" if user else f"group {group.name!r}"  # type: ignore[union-attr]
    _add(
        session,
        Submitter(policy_id=policy.id, user_id=user.id if user else None, group_id=group.id if group else None),
        f"{who} as a submitter of {policy.slug!r}",
    )


def remove_submitter(
    session: Session, policy: SigningPolicy, *, user: User | None = None, group: Group | None = None
) -> None:
    statement = delete(Submitter).where(Submitter.policy_id == policy.id)
    if user is not None:
        statement = statement.where(Submitter.user_id == user.id)
    if group is not None:
        statement = statement.where(Submitter.group_id == group.id)
    result = session.execute(statement)
    if result.rowcount == 0:
        raise NotFoundError(f"that submitter is not on policy {policy.slug!r}")


def list_submitters(session: Session, policy: SigningPolicy) -> list[str]:
    names = []
    for row in session.scalars(select(Submitter).where(Submitter.policy_id == policy.id)):
        if row.user_id:
            names.append(f"user:{session.get(User, row.user_id).name}")  # type: ignore[union-attr]
        else:
            names.append(f"group:{session.get(Group, row.group_id).name}")  # type: ignore[union-attr]
    return sorted(names)


# API tokens


def create_token(
    session: Session, user: User, *, description: str = "", expires_at: dt.datetime | None = None
) -> tokens.NewToken:
    new = tokens.generate()
    session.add(
        ApiToken(
            id=new.token_id, user_id=user.id, secret_hash=new.secret_hash, description=description, expires_at=expires_at
        )
    )
    session.flush()
    return new


def revoke_token(session: Session, token_id: str) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFoundError(f"no API token with id {token_id!r}")
    token.revoked_at = utcnow()
    session.flush()
    return token


def list_tokens(session: Session, user: User) -> Sequence[ApiToken]:
    return session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.created_at)).all()
