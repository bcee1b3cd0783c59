"""The service's RFC 3161 timestamp authority: TimeStampReq in, TimeStampResp out.

:meth:`TimestampAuthority.respond` never raises for what a client sends: a request it cannot
honour gets a rejection carrying the RFC 3161 failure code and a sentence saying why. The token
is CMS SignedData over a TSTInfo, signed through the keystore (only a digest leaves this module),
with the signed attributes ``openssl ts -verify`` and RFC 5816 expect: contentType, signingTime,
messageDigest and ESS signingCertificateV2 naming the TSA certificate.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from asn1crypto import cms, core, tsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..crypto.cms_builder import encode_attribute, encode_signed_attributes, encode_signed_data
from ..crypto.der import ASN1_ERRORS
from ..crypto.hashes import HashAlgorithm
from ..crypto.signatures import DigestSigner, EcdsaFormat, Scheme, SignatureRequest, verify_digest_signature
from ..crypto.timestamp_requests import FailureInfo, TimeStampResp
from ..crypto.timestamps import ID_CT_TST_INFO, check_timestamping_certificate
from ..errors import SignbridgeError, TimestampError
from .directory import load_chain, load_x509
from .keystores import KeyRef, Keystore
from .models import Certificate

logger = logging.getLogger(__name__)

# signbridge's default TSA policy. It lies under the UUID arc 2.25 (ITU-T X.667), which needs no
# registration: 2.25.<UUID 1d310c51-172b-40f9-ad4a-a6a3780fe22c as an integer>. It is a
# placeholder that says "issued by a signbridge TSA"; a deployment with a policy OID of its own
# passes it as ``policy``.
DEFAULT_POLICY_OID = "2.25.38802284237397620216780351296353853996"

DEFAULT_HASH_ALGORITHMS = (HashAlgorithm.SHA256, HashAlgorithm.SHA384, HashAlgorithm.SHA512)

# A TimeStampReq with a SHA-512 imprint, a policy and a nonce is under 150 bytes.
MAX_QUERY_SIZE = 16 * 1024

ATTR_SIGNING_CERTIFICATE_V2 = "1.2.840.113549.1.9.16.2.47"  # ESS signingCertificateV2 (RFC 5035)

# The digest that matches each curve's strength (P-256, P-384; larger curves get SHA-512).
_ECDSA_DIGEST = {256: HashAlgorithm.SHA256, 384: HashAlgorithm.SHA384}


class _Refusal(Exception):
    """A request the TSA will not honour; becomes a rejection reply."""

    def __init__(self, failure: FailureInfo, text: str) -> None:
        super().__init__(text)
        self.failure = failure
        self.text = text


class TimestampAuthority:
    """Issues RFC 3161 timestamps signed with the TSA key.

    ``certificate`` is the TSA certificate (critical EKU timeStamping only), ``chain`` its issuers
    (issuer first), ``sign`` signs a :class:`SignatureRequest` with the TSA key (RSA PKCS#1 v1.5;
    ECDSA returned as DER). Instances hold no mutable state, so one may serve many threads.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate],
        sign: DigestSigner,
        *,
        policy: str = DEFAULT_POLICY_OID,
        hash_algorithms: Iterable[HashAlgorithm] = DEFAULT_HASH_ALGORITHMS,
        accuracy: timedelta = timedelta(seconds=1),
    ) -> None:
        check_timestamping_certificate(certificate)
        public_key = certificate.public_key()
        if isinstance(public_key, rsa.RSAPublicKey):
            self._digest_algorithm = HashAlgorithm.SHA256
            self._scheme = Scheme.RSA_PKCS1
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            self._digest_algorithm = _ECDSA_DIGEST.get(public_key.curve.key_size, HashAlgorithm.SHA512)
            self._scheme = Scheme.ECDSA
        else:
            raise TimestampError(
                f"the timestamping certificate has a {type(public_key).__name__}; only RSA and ECDSA "
                "keys can sign timestamps"
            )
        if accuracy <= timedelta(0):
            raise TimestampError("the timestamp accuracy must be a positive duration")
        try:
            core.ObjectIdentifier(policy).dump()
        except ValueError:
            raise TimestampError(f"the timestamp policy {policy!r} is not an object identifier") from None

        self.certificate = certificate
        self.chain = tuple(chain)
        self.policy = policy
        self.hash_algorithms = tuple(hash_algorithms)
        self.accuracy = accuracy
        self._sign = sign
        self._public_key = public_key
        self._certificate_asn1 = _asn1_certificate(certificate)

    def respond(self, query_der: bytes) -> bytes:
        """The DER TimeStampResp for a DER TimeStampReq: a token, or a rejection saying why."""
        try:
            request = self._parse(query_der)
            token = self._issue(request)
        except _Refusal as refusal:
            return _rejection(refusal.failure, refusal.text)
        return TimeStampResp({"status": {"status": "granted"}, "time_stamp_token": token}).dump()

    # -----------------------------------------------------------------------------------------

    def _parse(self, query_der: bytes) -> tsp.TimeStampReq:
        if len(query_der) > MAX_QUERY_SIZE:
            raise _Refusal(
                FailureInfo.BAD_DATA_FORMAT,
                f"the request is {len(query_der)} bytes; a TimeStampReq is far smaller",
            )
        try:
            request = tsp.TimeStampReq.load(bytes(query_der), strict=True)
            request.native  # noqa: B018  (parses every field now, so malformed input fails here)
        except ASN1_ERRORS:
            raise _Refusal(
                FailureInfo.BAD_DATA_FORMAT, "the request is not a DER-encoded TimeStampReq"
            ) from None

        if request["version"].native != "v1":
            raise _Refusal(FailureInfo.BAD_DATA_FORMAT, "only version 1 TimeStampReq is supported")

        imprint = request["message_imprint"]
        # asn1crypto only parses SHA-2 identifiers with absent or NULL parameters; anything else
        # failed above as badDataFormat.
        oid = imprint["hash_algorithm"]["algorithm"].dotted
        accepted = ", ".join(_algorithm_name(a.oid) for a in self.hash_algorithms)
        algorithm = next((a for a in self.hash_algorithms if a.oid == oid), None)
        if algorithm is None:
            raise _Refusal(
                FailureInfo.BAD_ALG,
                f"the message imprint's hash algorithm {_algorithm_name(oid)} is not accepted; "
                f"use {accepted}",
            )
        digest = imprint["hashed_message"].native
        if len(digest) != algorithm.digest_size:
            raise _Refusal(
                FailureInfo.BAD_DATA_FORMAT,
                f"a {algorithm.title} message imprint is {algorithm.digest_size} bytes long, "
                f"not {len(digest)}",
            )

        req_policy = request["req_policy"]
        if not isinstance(req_policy, core.Void) and req_policy.dotted != self.policy:
            raise _Refusal(
                FailureInfo.UNACCEPTED_POLICY,
                f"the policy {req_policy.dotted} is not offered; this authority issues under {self.policy}",
            )
        extensions = request["extensions"]
        if not isinstance(extensions, core.Void) and len(extensions) > 0:
            names = ", ".join(extension["extn_id"].dotted for extension in extensions)
            raise _Refusal(
                FailureInfo.UNACCEPTED_EXTENSION, f"request extensions are not supported ({names})"
            )
        return request

    def _issue(self, request: tsp.TimeStampReq) -> cms.ContentInfo:
        gen_time = datetime.now(UTC)
        gen_time = gen_time.replace(microsecond=gen_time.microsecond // 1000 * 1000)
        fields = {
            "version": "v1",
            "policy": self.policy,
            # RFC 3161 §2.4.2: the same value as in the request.
            "message_imprint": tsp.MessageImprint.load(request["message_imprint"].dump()),
            # 128 random bits: unique across threads, processes and restarts without coordination.
            "serial_number": secrets.randbits(128),
            "gen_time": core.GeneralizedTime(gen_time),
            "accuracy": _accuracy(self.accuracy),
            "tsa": asn1_x509.GeneralName({"directory_name": self._certificate_asn1.subject}),
        }
        if request["nonce"].native is not None:
            fields["nonce"] = request["nonce"].native
        content = tsp.TSTInfo(fields).dump()

        ess = encode_attribute(ATTR_SIGNING_CERTIFICATE_V2, [self._signing_certificate_v2().dump()])
        signed_attrs_der = encode_signed_attributes(
            self._digest_algorithm.digest(content),
            hash_algorithm=self._digest_algorithm,
            signing_time=gen_time,
            content_type=ID_CT_TST_INFO,
            extra=[ess],
        )
        token = encode_signed_data(
            signed_attrs_der=signed_attrs_der,
            signature=self._signature(self._digest_algorithm.digest(signed_attrs_der)),
            certificates=(self.certificate, *self.chain) if request["cert_req"].native else (),
            signer_certificate=self.certificate,
            hash_algorithm=self._digest_algorithm,
            scheme=self._scheme,
            timestamp_token=None,
            content_type=ID_CT_TST_INFO,
            content=content,
        )
        return cms.ContentInfo.load(token)

    def _signing_certificate_v2(self) -> tsp.SigningCertificateV2:
        """ESS signingCertificateV2 (RFC 5035): the TSA certificate's SHA-256 hash and issuer/serial."""
        return tsp.SigningCertificateV2(
            {
                "certs": [
                    {
                        # The hash algorithm is left at its DER default, SHA-256.
                        "cert_hash": HashAlgorithm.SHA256.digest(self._certificate_asn1.dump()),
                        "issuer_serial": {
                            "issuer": [
                                asn1_x509.GeneralName({"directory_name": self._certificate_asn1.issuer})
                            ],
                            "serial_number": self._certificate_asn1.serial_number,
                        },
                    }
                ]
            }
        )

    def _signature(self, digest: bytes) -> bytes:
        """Sign ``digest`` through the keystore, and check the result before it leaves."""
        request = SignatureRequest(digest, self._digest_algorithm, self._scheme, EcdsaFormat.ASN1)
        try:
            signature = self._sign(request)
            verify_digest_signature(self._public_key, request, signature)
        except SignbridgeError as exc:
            logger.error("the timestamp authority could not sign: %s", exc)
            raise _Refusal(
                FailureInfo.SYSTEM_FAILURE, "the timestamp authority could not sign the timestamp"
            ) from None
        return signature


def _asn1_certificate(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


def _algorithm_name(oid: str) -> str:
    try:
        return HashAlgorithm.from_oid(oid).hashlib_name.upper().replace("SHA", "SHA-")
    except SignbridgeError:
        return oid


def _accuracy(accuracy: timedelta) -> tsp.Accuracy:
    microseconds = accuracy // timedelta(microseconds=1)
    seconds, rest = divmod(microseconds, 1_000_000)
    millis, micros = divmod(rest, 1000)
    fields = {"seconds": seconds, "millis": millis, "micros": micros}
    return tsp.Accuracy({name: value for name, value in fields.items() if value})


def _rejection(failure: FailureInfo, text: str) -> bytes:
    status = {"status": "rejection", "status_string": [text], "fail_info": {failure.value}}
    return TimeStampResp({"status": status}).dump()


def load_timestamp_authority(session: Session, keystore: Keystore) -> TimestampAuthority | None:
    """The service's newest timestamping certificate and key, or None when it has none."""
    row = session.scalars(
        select(Certificate).where(Certificate.purpose == "timestamping").order_by(Certificate.created_at.desc())
    ).first()
    if row is None:
        return None
    ref = KeyRef.parse(row.key_ref)
    return TimestampAuthority(load_x509(row), load_chain(row), lambda request: keystore.sign(ref, request))
