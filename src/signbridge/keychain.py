"""The keychain: signing identities found in the running signbridge tokens, and how to pick one.

This is what Apple's tools find in the keychain when a CryptoTokenKit token is inserted. Each
running token (see :mod:`signbridge.provider.registry`) is asked over its socket, with the pure-Python
PKCS#11 client, for its certificates and private keys. A certificate with a private key of the same
CKA_ID is an identity; its chain is built from the token's other certificates (the authority
objects), and its :attr:`~signbridge.identity.Identity.sign` sends one digest to the token with
C_Sign and checks the answer against the certificate before returning it.

    identity = select_identity("Developer ID Application", usage=Usage.CODE)
    signature = identity.sign(SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1))

Selection (:func:`select_identity`), as ``codesign -s`` and ``productsign --sign`` do it:

- 40 hex digits are a SHA-1 fingerprint and 64 hex digits a SHA-256 fingerprint of the certificate
  (either case); the name is not considered then.
- Anything else is matched against the certificate's common name, case-sensitively, as Apple's
  tools do: an identity whose common name equals the text wins; otherwise every identity whose
  common name contains it matches (so a team id such as ``TEAM123456`` matches
  ``Developer ID Application: Test Corp (TEAM123456)``).
- With ``usage`` only identities of that kind are candidates, so a team id alone selects the
  installer certificate for productsign and the application certificate for codesign.
- Certificates outside their validity period are passed over (Apple's codesign reports them as
  "no identity found"), so an expired certificate never makes its renewal ambiguous.
- Several remaining matches are an :class:`AmbiguousIdentityError` listing them; the same
  certificate served by two tokens is ambiguous too (choose the token).

Each sign opens its own connection to the token, logs in and finds the key by its CKA_ID, so an
identity can be used from any number of threads, and keeps working across a restart of its token.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .apple.certificates import Usage
from .errors import NotFoundError, SignatureError, SignbridgeError
from .identity import Identity
from .pkcs11 import CKA, CKO, Pkcs11Client, Pkcs11Error, Pkcs11Object, pss_params
from .pkcs11.constants import CATEGORY_AUTHORITY, CKM, CKR
from .provider import registry
from .provider.registry import TokenRecord
from .signatures import (
    CertificateSignatureError,
    EcdsaFormat,
    Scheme,
    SignatureRequest,
    ecdsa_ieee_to_der,
    verify_certificate_signature,
    verify_digest_signature,
)

log = logging.getLogger("signbridge.keychain")

DRIVER_ID = "io.signbridge.token"
"""The token driver's identifier: ``security list-smartcard`` prints ``<DRIVER_ID>:<token name>``,
as macOS prints ``com.apple.pivtoken:<card id>``. It never changes."""

DEFAULT_PIN = "CONFIG"  # the provider then uses the credentials it was started with
LIST_TIMEOUT = 30.0  # seconds for one answer while listing
SIGN_TIMEOUT = 900.0  # a sign may wait for the service's own retries (ServiceUnavailableTimeout 600 s)
MAX_CHAIN = 8

_SHA1 = re.compile(r"[0-9A-Fa-f]{40}")
_SHA256 = re.compile(r"[0-9A-Fa-f]{64}")
_FINGERPRINT = hashes.SHA256()


# --- errors -------------------------------------------------------------------------------------


class NoTokenError(NotFoundError):
    """No signbridge token is running (or none of the named ones)."""

    def __init__(self, message: str = "no signbridge token is running; start one with `signbridge start`"):
        super().__init__(message)


class TokenAccessError(SignbridgeError):
    """A running token could not be read: it refused the PIN or broke the protocol."""


class NoIdentityError(NotFoundError):
    """No identity matches the name."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


class UnsuitableIdentityError(NoIdentityError):
    """The name matches identities, but only of another kind than the operation needs."""

    def __init__(self, message: str, name: str, candidates: Sequence[Identity]) -> None:
        super().__init__(message, name)
        self.candidates = tuple(candidates)


class AmbiguousIdentityError(SignbridgeError):
    """The name matches several identities; ``candidates`` lists them."""

    def __init__(self, name: str, candidates: Sequence[Identity]) -> None:
        self.name = name
        self.candidates = tuple(candidates)
        super().__init__(f"{name}: ambiguous (matches {_describe_candidates(self.candidates)})")


# --- tokens -------------------------------------------------------------------------------------


def smartcard_id(token: TokenRecord) -> str:
    """``io.signbridge.token:<name>``: what ``security list-smartcard`` prints for the token."""
    return f"{DRIVER_ID}:{token.name}"


def find_tokens(names: Iterable[str] | None = None) -> list[TokenRecord]:
    """The running tokens, or the running ones among ``names`` (a name may also be written as
    its smartcard id). Raises :class:`NoTokenError` when none is running or a name is not."""
    running = registry.running_tokens()
    if not running:
        raise NoTokenError()
    wanted = [name.removeprefix(f"{DRIVER_ID}:") for name in names or ()]
    if not wanted:
        return running
    by_name = {token.name: token for token in running}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        listed = ", ".join(sorted(by_name))
        raise NoTokenError(f'no signbridge token named "{missing[0]}" is running (running: {listed})')
    return [by_name[name] for name in dict.fromkeys(wanted)]


# --- discovery ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """What the tokens hold: their identities, and one line per token that could not be read."""

    identities: tuple[Identity, ...]
    problems: tuple[str, ...] = ()


def discover(*, tokens: Sequence[TokenRecord] | None = None, pin: str = DEFAULT_PIN) -> Discovery:
    """The identities of ``tokens`` (default: every running token, :class:`NoTokenError` if none).

    A token that cannot be read is reported in ``problems`` and the others are still listed.
    """
    records = find_tokens() if tokens is None else list(tokens)
    identities: list[Identity] = []
    problems: list[str] = []
    for record in records:
        try:
            identities.extend(_token_identities(record, pin))
        except (Pkcs11Error, TokenAccessError) as exc:
            log.warning("token %s could not be read: %s", record.name, exc)
            problems.append(f"token {record.name} could not be read: {exc}")
    return Discovery(tuple(identities), tuple(problems))


def list_identities(*, tokens: Sequence[TokenRecord] | None = None, pin: str = DEFAULT_PIN) -> list[Identity]:
    """Every identity in ``tokens`` (default: all running tokens).

    Raises :class:`NoTokenError` when no token is running, and :class:`TokenAccessError` when no
    token could be read at all; a token that fails while others answer is logged and skipped
    (:func:`discover` reports it).
    """
    found = discover(tokens=tokens, pin=pin)
    if found.problems and not found.identities:
        raise TokenAccessError("; ".join(found.problems))
    return list(found.identities)


def _token_identities(record: TokenRecord, pin: str) -> list[Identity]:
    with Pkcs11Client.connect(record.socket, timeout=LIST_TIMEOUT) as client:
        identities = []
        for slot in client.slots():
            label = client.token_info(slot).label
            _login(client, slot, record.name, pin)
            identities.extend(_slot_identities(client, slot, record, label, pin))
        return identities


def _login(client: Pkcs11Client, slot: int, token_name: str, pin: str) -> None:
    try:
        client.login(pin, slot)
    except Pkcs11Error as exc:
        if exc.ckr == CKR.PIN_INCORRECT:
            raise TokenAccessError(f"the token {token_name} did not accept the PIN") from None
        raise


def _slot_identities(
    client: Pkcs11Client, slot: int, record: TokenRecord, label: str, pin: str
) -> list[Identity]:
    keys = {key.id for key in client.objects(slot, object_class=CKO.PRIVATE_KEY) if key.id}
    leaves: list[tuple[Pkcs11Object, x509.Certificate]] = []
    pool: list[x509.Certificate] = []
    for obj in client.certificates(slot):
        der = obj.attributes.get(CKA.VALUE)
        try:
            certificate = x509.load_der_x509_certificate(bytes(der or b""))  # type: ignore[arg-type]
        except ValueError:
            log.warning("token %s: certificate object %r is not X.509 DER; skipped", record.name, obj.label)
            continue
        category = obj.attributes.get(CKA.CERTIFICATE_CATEGORY)
        if category != CATEGORY_AUTHORITY and obj.id in keys:
            leaves.append((obj, certificate))
        else:
            pool.append(certificate)
    identities = []
    for obj, certificate in leaves:
        signer = TokenKey(record.name, record.socket, label, obj.id, certificate, pin)
        chain = build_chain(certificate, pool)
        identities.append(Identity(certificate, chain, signer, record.name))
    return identities


# --- chains and validity ------------------------------------------------------------------------


def build_chain(leaf: x509.Certificate, pool: Iterable[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The issuers of ``leaf`` found in ``pool``, nearest first, up to a self-signed root.

    An issuer is taken only when its subject is the certificate's issuer and its key verifies the
    certificate's signature. The chain stops where no issuer is found.
    """
    candidates = list(pool)
    chain: list[x509.Certificate] = []
    seen = {leaf.fingerprint(_FINGERPRINT)}
    current = leaf
    while len(chain) < MAX_CHAIN and not _self_signed(current):
        issuer = next(
            (
                candidate
                for candidate in candidates
                if candidate.fingerprint(_FINGERPRINT) not in seen and _issued_by(current, candidate)
            ),
            None,
        )
        if issuer is None:
            break
        chain.append(issuer)
        seen.add(issuer.fingerprint(_FINGERPRINT))
        current = issuer
    return tuple(chain)


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        verify_certificate_signature(certificate, issuer)
    except CertificateSignatureError:
        return False
    return True


def _self_signed(certificate: x509.Certificate) -> bool:
    return certificate.subject == certificate.issuer and _issued_by(certificate, certificate)


def validity_problem(identity: Identity, *, now: datetime | None = None) -> str | None:
    """Why ``security find-identity -v`` would leave the identity out, in Apple's words, or None.

    ``CSSMERR_TP_CERT_EXPIRED`` / ``CSSMERR_TP_CERT_NOT_VALID_YET`` when a certificate of the chain
    is outside its validity period; ``CSSMERR_TP_NOT_TRUSTED`` when the chain does not end at a
    self-signed root the token serves.
    """
    when = now or datetime.now(UTC)
    for certificate in (identity.certificate, *identity.chain):
        problem = _time_problem(certificate, when)
        if problem:
            return problem
    if not identity.chain or not _self_signed(identity.chain[-1]):
        return "CSSMERR_TP_NOT_TRUSTED"  # a self-signed leaf is not trusted either, as on macOS
    return None


def _time_problem(certificate: x509.Certificate, when: datetime) -> str | None:
    if when < certificate.not_valid_before_utc:
        return "CSSMERR_TP_CERT_NOT_VALID_YET"
    if when > certificate.not_valid_after_utc:
        return "CSSMERR_TP_CERT_EXPIRED"
    return None


# --- selection ----------------------------------------------------------------------------------


def select_identity(
    name: str,
    *,
    usage: Usage | None,
    identities: Sequence[Identity] | None = None,
    tokens: Sequence[TokenRecord] | None = None,
    now: datetime | None = None,
) -> Identity:
    """The one identity ``name`` designates (see the module documentation for the rules).

    ``identities`` defaults to those of ``tokens`` (default: every running token). ``usage`` is
    what the caller will sign: :attr:`Usage.CODE` for codesign, :attr:`Usage.INSTALLER` for
    productsign, None for anything.

    Raises :class:`NoTokenError`, :class:`NoIdentityError` (:class:`UnsuitableIdentityError`
    when the name matches only identities of another kind) or :class:`AmbiguousIdentityError`.
    """
    problems: tuple[str, ...] = ()
    if identities is None:
        found = discover(tokens=tokens)
        identities, problems = found.identities, found.problems
    suitable = [identity for identity in identities if usage is None or identity.usage is usage]
    matched = _matching(name, suitable)
    if not matched:
        others = _matching(name, [identity for identity in identities if identity not in suitable])
        if others and usage is not None:
            raise UnsuitableIdentityError(_unsuitable_message(name, usage, others), name, others)
        raise NoIdentityError(_with_problems(f"{name}: no identity found", problems), name)
    when = now or datetime.now(UTC)
    current = [identity for identity in matched if _time_problem(identity.certificate, when) is None]
    if not current:
        reasons = "; ".join(_outside_validity(identity, when) for identity in matched)
        raise NoIdentityError(f"{name}: no identity found ({reasons})", name)
    if len(current) > 1:
        raise AmbiguousIdentityError(name, current)
    return current[0]


def _matching(name: str, identities: Sequence[Identity]) -> list[Identity]:
    if _SHA1.fullmatch(name):
        return [identity for identity in identities if identity.sha1 == name.upper()]
    if _SHA256.fullmatch(name):
        return [identity for identity in identities if identity.sha256 == name.upper()]
    if not name:
        return []
    exact = [identity for identity in identities if identity.common_name == name]
    return exact or [identity for identity in identities if name in identity.common_name]


def _unsuitable_message(name: str, usage: Usage, others: Sequence[Identity]) -> str:
    kinds = {identity.usage for identity in others}
    if usage is Usage.CODE:
        why = (
            "it is an installer identity"
            if kinds == {Usage.INSTALLER}
            else "its certificate is not for code signing"
        )
        return (
            f"{name}: this identity cannot be used for signing code ({why}; "
            "a code signing identity such as Developer ID Application is needed)"
        )
    if usage is Usage.INSTALLER:
        what = (
            "application signing identities"
            if kinds == {Usage.CODE}
            else "identities that are not for installer signing"
        )
        return (
            f'"{name}" matches only {what}. An installer signing identity (not an application '
            "signing identity) is required for signing flat-style products."
        )
    return f"{name}: no identity for {usage.value} found"


def _outside_validity(identity: Identity, when: datetime) -> str:
    certificate = identity.certificate
    which = f'"{identity.common_name}" in {identity.source}'
    if when < certificate.not_valid_before_utc:
        return f"{which} is not valid before {_date(certificate.not_valid_before_utc)}"
    return f"{which} expired on {_date(certificate.not_valid_after_utc)}"


def _date(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _with_problems(message: str, problems: Sequence[str]) -> str:
    return message if not problems else f"{message} ({'; '.join(problems)})"


def _describe_candidates(candidates: Sequence[Identity]) -> str:
    sources = list(dict.fromkeys(identity.source for identity in candidates))
    names = [f'"{identity.common_name}"' for identity in candidates]
    if len(sources) == 1:
        return f"{_and(names)} in {sources[0]}"
    return _and([f"{name} in {identity.source}" for name, identity in zip(names, candidates, strict=True)])


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


# --- signing through the token ------------------------------------------------------------------


@dataclass(frozen=True)
class TokenKey:
    """Signs digests with one private key of a running token: the ``sign`` of an :class:`Identity`.

    Each call connects, logs in, finds the key by CKA_ID on the token with this label, signs with
    C_Sign and verifies the result against the certificate. RSA PKCS#1 v1.5 sends the DigestInfo
    (CKM_RSA_PKCS), PSS the digest with MGF1 and a hash-sized salt (CKM_RSA_PKCS_PSS), ECDSA the
    digest (CKM_ECDSA); ECDSA signatures are returned as DER.
    """

    token_name: str
    socket: str
    token_label: str
    key_id: bytes
    certificate: x509.Certificate = dataclasses.field(repr=False)
    pin: str = dataclasses.field(default=DEFAULT_PIN, repr=False)

    def __call__(self, request: SignatureRequest) -> bytes:
        public_key = self.certificate.public_key()
        mechanism, data, params = _mechanism(public_key, request)
        try:
            raw = self._sign(mechanism, data, params)
        except (Pkcs11Error, TokenAccessError) as exc:
            raise SignatureError(f"the token {self.token_name} could not sign: {exc}") from None
        signature = raw
        answered = request
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            signature = ecdsa_ieee_to_der(raw, public_key.curve)
            answered = dataclasses.replace(request, ecdsa_format=EcdsaFormat.ASN1)
        try:
            verify_digest_signature(public_key, answered, signature)
        except SignatureError as exc:
            raise SignatureError(
                f"the token {self.token_name} returned a signature that does not verify "
                f"against the certificate: {exc}"
            ) from None
        return signature

    def _sign(self, mechanism: int, data: bytes, params: object) -> bytes:
        with Pkcs11Client.connect(self.socket, timeout=SIGN_TIMEOUT) as client:
            slot = self._slot(client)
            _login(client, slot, self.token_name, self.pin)
            keys = client.objects(slot, object_class=CKO.PRIVATE_KEY, id=self.key_id, attributes=(CKA.CLASS,))
            if not keys:
                raise TokenAccessError(f"it no longer has the private key {self.key_id!r}")
            return client.sign(keys[0], mechanism, data, params)  # type: ignore[arg-type]

    def _slot(self, client: Pkcs11Client) -> int:
        for slot in client.slots():
            if client.token_info(slot).label == self.token_label:
                return slot
        raise TokenAccessError(f"it no longer serves the token {self.token_label!r}")


def _mechanism(public_key: object, request: SignatureRequest) -> tuple[int, bytes, object]:
    if isinstance(public_key, rsa.RSAPublicKey):
        if request.scheme is Scheme.RSA_PKCS1:
            return CKM.RSA_PKCS, request.hash_algorithm.digest_info(request.digest), None
        if request.scheme is Scheme.RSA_PSS:
            return CKM.RSA_PKCS_PSS, request.digest, pss_params(request.hash_algorithm)
        raise SignatureError(f"an RSA key cannot make {request.scheme.value} signatures")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if request.scheme is not Scheme.ECDSA:
            raise SignatureError(f"an ECDSA key cannot make {request.scheme.value} signatures")
        return CKM.ECDSA, request.digest, None
    raise SignatureError(f"the token cannot sign with a {type(public_key).__name__}")




# --- registration with p11-kit ------------------------------------------------------------------

P11KIT_CONFIG_DIR = Path("/etc/pkcs11")
P11KIT_SYSTEM_MODULE_DIRS = (P11KIT_CONFIG_DIR / "modules", Path("/usr/share/p11-kit/modules"))


@dataclass(frozen=True)
class P11KitListing:
    """What ``p11-kit list-modules`` shows: module names with the labels of their tokens."""

    modules: dict[str, list[str]]
    problem: str | None = None  # why p11-kit could not list its modules


@dataclass(frozen=True)
class Registration:
    """Whether p11-kit, and so every p11-kit-proxy consumer, sees a running token."""

    registered: bool
    module: str | None  # the p11-kit module name (the module file's name without ".module")
    detail: str  # why not, or which module

    def describe(self) -> str:
        return f"{'yes' if self.registered else 'no'} ({self.detail})"


def list_p11kit_modules() -> P11KitListing:
    """Run ``p11-kit list-modules`` and parse what it shows."""
    try:
        process = subprocess.run(
            ["p11-kit", "list-modules"], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        return P11KitListing({}, "p11-kit is not installed")
    except subprocess.TimeoutExpired:
        return P11KitListing({}, "p11-kit list-modules did not finish within 60 seconds")
    modules = p11kit_modules(process.stdout)
    if process.returncode != 0 and not modules:
        if P11KIT_CONFIG_DIR.is_dir() and not os.access(P11KIT_CONFIG_DIR, os.R_OK | os.X_OK):
            problem = f"p11-kit cannot read {P11KIT_CONFIG_DIR} (permission denied) and loads no module"
            return P11KitListing({}, problem)
        lines = process.stderr.strip().splitlines()
        return P11KitListing({}, lines[-1] if lines else f"p11-kit list-modules exited {process.returncode}")
    return P11KitListing(modules)


def p11kit_modules(listing: str) -> dict[str, list[str]]:
    """Module names and the labels of their tokens, from ``p11-kit list-modules`` output."""
    modules: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        if line and not line[0].isspace() and ":" in line:
            current = modules.setdefault(line.split(":", 1)[0].strip(), [])
        elif current is not None and line.startswith("    token:"):
            current.append(line.split(":", 1)[1].strip())
    return modules


def p11kit_user_module_dir() -> Path:
    """``~/.config/pkcs11/modules`` (``$XDG_CONFIG_HOME/pkcs11/modules``), which p11-kit skips for root."""
    config_home = os.environ.get("XDG_CONFIG_HOME")
    return (Path(config_home) if config_home else Path.home() / ".config") / "pkcs11" / "modules"


def p11kit_registration(token: TokenRecord, listing: P11KitListing) -> Registration:
    """Whether ``listing`` shows the token's module file with the token in it, and if not, why."""
    if not token.module_file:
        return Registration(False, None, "the token was started without a p11-kit module file")
    module_path = Path(token.module_file)
    module = module_path.name.removesuffix(".module")
    if not module_path.is_file():
        return Registration(False, module, f"its module file {module_path} is missing")
    if listing.problem:
        return Registration(False, module, listing.problem)
    if module not in listing.modules:
        user_dir = p11kit_user_module_dir()
        if module_path.parent == user_dir and os.geteuid() == 0:
            why = f"p11-kit ignores the module files in {user_dir} when run as root"
            return Registration(False, module, why)
        if module_path.parent not in (user_dir, *P11KIT_SYSTEM_MODULE_DIRS):
            return Registration(False, module, f"p11-kit does not read module files in {module_path.parent}")
        return Registration(False, module, f"p11-kit list-modules does not show module {module}")
    if token.name not in listing.modules[module]:
        return Registration(False, module, f"p11-kit lists module {module} but cannot reach the token in it")
    return Registration(True, module, f"module {module}")
