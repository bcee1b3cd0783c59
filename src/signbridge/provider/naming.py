"""Token names: one per organization and filter set, fit for a PKCS#11 label and a file name.

The name is the token's CKA label (``pkcs11:token=<name>``), its directory in the registry and
the stem of its p11-kit module file, so it must fit PKCS#11's 32-byte label and p11-kit's rule
for module file names (a letter or digit, then letters, digits, ``.``, ``_``, ``-``). Derived
names start with ``signbridge-`` and the first 8 characters of the organization id, then the
project and policy filters: ``signbridge-0a1b2c3d``, ``signbridge-0a1b2c3d-demo``,
``signbridge-0a1b2c3d-demo-release-signing``. A policy filter without a project filter leaves
the project empty (``signbridge-0a1b2c3d--release-signing``). Names that would be longer than 32
characters are cut and end in 6 hex digits of a hash of the whole, so they stay distinct.
"""

from __future__ import annotations

import hashlib
import re

from ..errors import UsageError

PREFIX = "signbridge-"
MAX_LENGTH = 32
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def token_name(organization_id: str, project_slug: str | None, signing_policy_slug: str | None) -> str:
    """The derived name of the token for an organization and filters."""
    name = PREFIX + organization_id.lower()[:8]
    if project_slug or signing_policy_slug:
        name += "-" + (project_slug or "")
    if signing_policy_slug:
        name += "-" + signing_policy_slug
    if len(name) <= MAX_LENGTH:
        return name
    whole = f"{organization_id.lower()}\0{project_slug or ''}\0{signing_policy_slug or ''}"
    digest = hashlib.sha256(whole.encode()).hexdigest()[:6]
    return name[: MAX_LENGTH - 7].rstrip("-.") + "-" + digest


def check_name(name: str) -> str:
    """A name given with ``--name``, checked; raises :class:`UsageError` with the rule."""
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"--name {name!r} cannot name a token: use 1 to 32 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
