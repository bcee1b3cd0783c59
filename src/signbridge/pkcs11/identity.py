"""Token objects for a signing identity (certificate + public key + private key) and for CA certificates.

The three objects of one identity share CKA_ID and CKA_LABEL, which is how pkcs11-tool, libp11,
pkcs11-provider and osslsigncode pair a key with its certificate. Byte values (subject, issuer,
serial number, public key info) are copied from the certificate's own DER.

Private keys carry CKA_PRIVATE=true by default: as on a smart card they are visible only after
C_Login. Every consumer that is given a PIN logs in before it looks for the key (pkcs11-tool
--login, p11tool --login, libp11's ``pin-value=``/``-pass``, osslsigncode ``-pass``, python-pkcs11
``open(user_pin=...)``), so this costs nothing and keeps key listings behind the PIN. A PIN-less
token uses ``private=False`` with ``Token(require_login=False)``.
"""

from __future__ import annotations

import functools
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..crypto.ber import BerError, children, read_tlv
from ..crypto.der import CertificateFormatError, tbs_fields
from ..crypto.der_encoding import encode_octet_string, encode_oid
from ..errors import ConfigError
from .constants import CATEGORY_AUTHORITY, CATEGORY_TOKEN_USER, CKA, CKC, CKK, CKO
from .objects import TokenObject
from .signing import SIGN_MECHANISMS

_CURVE_OIDS = {
    "secp256r1": "1.2.840.10045.3.1.7",
    "secp384r1": "1.3.132.0.34",
    "secp521r1": "1.3.132.0.35",
}


def objects_for_identity(
    certificate: x509.Certificate, key_id: bytes | str, label: str, *, private: bool = True
) -> tuple[TokenObject, TokenObject, TokenObject]:
    """The certificate, public-key and private-key objects of one signing identity.

    ``key_id`` becomes CKA_ID (a str is UTF-8 encoded, e.g. SignPath's ``project/policy``).
    ``private`` sets CKA_PRIVATE on the private key: visible only after C_Login.
    """
    cka_id = key_id.encode("utf-8") if isinstance(key_id, str) else bytes(key_id)
    public_key = certificate.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"certificate {label!r} has a {type(public_key).__name__} key; "
            "p11-kit can carry only RSA and ECDSA signatures, so the token serves only those"
        )
    parsed = _Parsed(certificate)
    cert = _certificate_attributes(parsed, cka_id, label, CATEGORY_TOKEN_USER)
    key_attributes = _key_attributes(public_key, parsed)
    common = {
        CKA.ID: cka_id,
        CKA.LABEL: label.encode("utf-8"),
        CKA.TOKEN: True,
        CKA.MODIFIABLE: False,
        CKA.COPYABLE: False,
        CKA.DESTROYABLE: False,
        CKA.SUBJECT: parsed.subject,
        CKA.LOCAL: False,
        CKA.DERIVE: False,
        CKA.START_DATE: b"",
        CKA.END_DATE: b"",
        CKA.PUBLIC_KEY_INFO: parsed.public_key_info,
        **key_attributes,
    }
    public = {
        **common,
        CKA.CLASS: CKO.PUBLIC_KEY.value,
        CKA.PRIVATE: False,
        CKA.VERIFY: True,
        CKA.VERIFY_RECOVER: False,
        CKA.ENCRYPT: False,
        CKA.WRAP: False,
        CKA.TRUSTED: False,
    }
    key_type = key_attributes[CKA.KEY_TYPE]
    private_key = {
        **common,
        CKA.CLASS: CKO.PRIVATE_KEY.value,
        CKA.PRIVATE: private,
        CKA.SIGN: True,
        CKA.SIGN_RECOVER: False,
        CKA.DECRYPT: False,
        CKA.UNWRAP: False,
        CKA.SENSITIVE: True,
        CKA.ALWAYS_SENSITIVE: True,
        CKA.EXTRACTABLE: False,
        CKA.NEVER_EXTRACTABLE: True,
        CKA.ALWAYS_AUTHENTICATE: False,
        CKA.WRAP_WITH_TRUSTED: False,
        CKA.ALLOWED_MECHANISMS: _allowed_mechanisms(key_type),
    }
    private_key.pop(CKA.MODULUS_BITS, None)  # a public-key attribute only
    return (
        TokenObject(cert),
        TokenObject(public, public_key),
        TokenObject(private_key, public_key),
    )


def authority_object(
    certificate: x509.Certificate, key_id: bytes | str | None = None, label: str | None = None
) -> TokenObject:
    """A CA certificate (CKA_CERTIFICATE_CATEGORY 2) for building chains; no key of its own.

    CKA_ID defaults to the subject key identifier (or the SHA-1 of the public key), CKA_LABEL to
    the subject's common name.
    """
    parsed = _Parsed(certificate)
    if key_id is None:
        cka_id = parsed.key_identifier
    else:
        cka_id = key_id.encode("utf-8") if isinstance(key_id, str) else bytes(key_id)
    if label is None:
        names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        label = str(names[0].value) if names else certificate.subject.rfc4514_string()
    return TokenObject(_certificate_attributes(parsed, cka_id, label, CATEGORY_AUTHORITY))


class _Parsed:
    """The certificate's DER pieces, byte-exact as issued."""

    def __init__(self, certificate: x509.Certificate) -> None:
        self.der = certificate.public_bytes(Encoding.DER)
        try:
            fields = tbs_fields(certificate)
            spki = children(fields.public_key_info, read_tlv(fields.public_key_info, 0, len(fields.public_key_info), 0))
        except (CertificateFormatError, BerError) as exc:
            raise ConfigError(f"the certificate cannot be served: {exc}") from None
        self.serial_number = fields.serial_number
        self.issuer = fields.issuer
        self.subject = fields.subject
        self.public_key_info = fields.public_key_info
        if len(spki) != 2 or spki[1].identifier != b"\x03":
            raise ConfigError("the certificate's subjectPublicKeyInfo is malformed")
        # The BIT STRING's contents after its unused-bits octet.
        key_bits = self.public_key_info[spki[1].content_start + 1 : spki[1].content_end]
        self.public_key_hash = hashlib.sha1(key_bits).digest()
        self._certificate = certificate

    @functools.cached_property
    def key_identifier(self) -> bytes:
        """The subject key identifier, else the SHA-1 of the public key (only CA objects use it:
        reading the extensions costs more than the rest of this class)."""
        try:
            return self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            return self.public_key_hash


@functools.cache
def _allowed_mechanisms(key_type: int) -> tuple[int, ...]:
    return tuple(int(spec.type) for spec in SIGN_MECHANISMS.values() if spec.key_type == key_type)


def _certificate_attributes(parsed: _Parsed, cka_id: bytes, label: str, category: int) -> dict:
    return {
        CKA.CLASS: CKO.CERTIFICATE.value,
        CKA.TOKEN: True,
        CKA.PRIVATE: False,
        CKA.MODIFIABLE: False,
        CKA.COPYABLE: False,
        CKA.DESTROYABLE: False,
        CKA.LABEL: label.encode("utf-8"),
        CKA.ID: cka_id,
        CKA.CERTIFICATE_TYPE: CKC.X_509.value,
        CKA.CERTIFICATE_CATEGORY: category,
        CKA.TRUSTED: False,
        CKA.CHECK_VALUE: hashlib.sha1(parsed.der).digest()[:3],
        CKA.START_DATE: b"",
        CKA.END_DATE: b"",
        CKA.SUBJECT: parsed.subject,
        CKA.ISSUER: parsed.issuer,
        CKA.SERIAL_NUMBER: parsed.serial_number,
        CKA.VALUE: parsed.der,
        CKA.URL: b"",
        CKA.HASH_OF_SUBJECT_PUBLIC_KEY: parsed.public_key_hash,
        CKA.JAVA_MIDP_SECURITY_DOMAIN: 0,
        CKA.PUBLIC_KEY_INFO: parsed.public_key_info,
    }


def _key_attributes(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, parsed: _Parsed) -> dict:
    if isinstance(public_key, rsa.RSAPublicKey):
        numbers = public_key.public_numbers()
        return {
            CKA.KEY_TYPE: CKK.RSA.value,
            CKA.MODULUS: numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
            CKA.PUBLIC_EXPONENT: numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"),
            CKA.MODULUS_BITS: public_key.key_size,
        }
    oid = _CURVE_OIDS.get(public_key.curve.name)
    if oid is None:
        raise ConfigError(
            f"the EC curve {public_key.curve.name} is not supported (use P-256, P-384 or P-521)"
        )
    point = public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    return {
        CKA.KEY_TYPE: CKK.EC.value,
        CKA.EC_PARAMS: encode_oid(oid),
        CKA.EC_POINT: encode_octet_string(point),
    }
