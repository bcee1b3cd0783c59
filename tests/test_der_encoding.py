"""The DER encoder and the certificate field reader, checked against two independent parsers
(asn1crypto and openssl asn1parse)."""

from __future__ import annotations

import datetime
import subprocess

import pytest
from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from signbridge.crypto.ber import NULL, BerError, encode_tlv
from signbridge.crypto.cms import CmsFormatError, check_unsigned_fields, read_signed_data
from signbridge.crypto.der import tbs_fields
from signbridge.crypto.der_decoding import oid_from_content
from signbridge.crypto.der_encoding import (
    encode_integer,
    encode_octet_string,
    encode_oid,
    encode_sequence,
    encode_set_of,
    encode_time,
)
from signbridge.crypto.timestamps import parse_token
from signbridge.errors import TimestampError

UTC = datetime.UTC


@pytest.mark.parametrize(
    "dotted",
    ["1.2.840.113549.1.7.2", "2.5.4.3", "0.9.2342.19200300.100.1.25", "2.999.1", "1.3.6.1.4.1.311.2.1.12",
     "1.2.840.113635.100.9.2", "2.16.840.1.101.3.4.2.1", "1.0", "2.100.16383.16384.2097151"],
)  # fmt: skip
def test_object_identifiers_match_an_independent_encoder(dotted: str) -> None:
    assert encode_oid(dotted) == core.ObjectIdentifier(dotted).dump()
    assert core.ObjectIdentifier.load(encode_oid(dotted)).dotted == dotted


@pytest.mark.parametrize("dotted", ["", "1", "3.1", "1.40", "1.2.-3", "1..2", "a.b"])
def test_malformed_object_identifiers_are_refused(dotted: str) -> None:
    with pytest.raises(ValueError, match="not an object identifier"):
        encode_oid(dotted)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, 32767, 32768, 2**64, 2**159 - 1, 2**160])
def test_integers_are_minimal_and_positive(value: int) -> None:
    encoded = encode_integer(value)
    assert encoded == core.Integer(value).dump()
    assert core.Integer.load(encoded).native == value


def test_negative_integers_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        encode_integer(-1)


@pytest.mark.parametrize(
    ("when", "tag"),
    [
        (datetime.datetime(2026, 12, 3, 17, 5, 9, 999999, tzinfo=UTC), 0x17),
        (datetime.datetime(1950, 1, 1, tzinfo=UTC), 0x17),
        (datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), 0x17),
        (datetime.datetime(2050, 1, 1, tzinfo=UTC), 0x18),
        (datetime.datetime(1949, 12, 31, 23, 59, 59, tzinfo=UTC), 0x18),
        (datetime.datetime(2099, 12, 31, 1, 2, 3, tzinfo=datetime.timezone(datetime.timedelta(hours=2))), 0x18),
    ],
)
def test_times_are_utc_time_until_2049_in_whole_seconds(when: datetime.datetime, tag: int) -> None:
    encoded = encode_time(when)
    assert encoded[0] == tag
    parsed = (core.UTCTime if tag == 0x17 else core.GeneralizedTime).load(encoded).native
    assert parsed == when.astimezone(UTC).replace(microsecond=0)


def test_structures_parse_with_openssl(tmp_path) -> None:  # noqa: ANN001
    value = encode_sequence(
        encode_oid("1.2.840.113549.1.7.1"),
        NULL,
        encode_set_of([encode_integer(300), encode_integer(2), encode_octet_string(b"x" * 200)]),
    )
    path = tmp_path / "value.der"
    path.write_bytes(value)
    listing = subprocess.run(
        ["openssl", "asn1parse", "-inform", "DER", "-in", str(path)], capture_output=True, text=True, check=True
    ).stdout
    values = [" ".join(line.partition("prim: ")[2].split()) for line in listing.splitlines() if "prim: " in line]
    # DER orders a SET OF by the encodings: INTEGER 2 (02 01 02) before INTEGER 300 (02 02 01 2c)
    # before the OCTET STRING (04 81 c8 ...).
    assert values[:4] == ["OBJECT :pkcs7-data", "NULL", "INTEGER :02", "INTEGER :012C"]
    assert values[4].startswith("OCTET STRING :xxx")


def test_certificate_fields_are_the_issued_bytes() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.COMMON_NAME, "Issuer ü", _type=x509.name._ASN1Type.BMPString),
    ])  # fmt: skip
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Subject")])
    now = datetime.datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(2**159 - 7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    fields = tbs_fields(certificate)
    independent = asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))["tbs_certificate"]
    assert fields.serial_number == independent["serial_number"].dump()
    assert fields.issuer == independent["issuer"].dump()
    assert fields.subject == independent["subject"].dump()
    assert fields.public_key_info == independent["subject_public_key_info"].dump()


def _signed_data_with(content_type: bytes, version: bytes) -> bytes:
    """A ContentInfo(SignedData) of one signer whose encapsulated content type and SignerInfo
    version are given."""
    signer_info = encode_sequence(
        version,
        encode_sequence(encode_sequence(), encode_integer(1)),  # issuer and serial number
        encode_sequence(encode_oid("2.16.840.1.101.3.4.2.1")),
        encode_sequence(encode_oid("1.2.840.113549.1.1.1"), NULL),
        encode_octet_string(bytes(256)),
    )
    signed_data = encode_sequence(
        encode_integer(1), encode_set_of([]), encode_sequence(content_type), encode_set_of([signer_info])
    )
    return encode_sequence(encode_oid("1.2.840.113549.1.7.2"), encode_tlv(0xA0, signed_data))


HUGE_ARC_OID = encode_tlv(0x06, b"\x2a" + b"\xff" * 3000 + b"\x7f")
NON_MINIMAL_OID = encode_tlv(0x06, b"\x2a\x80\x01")
HUGE_INTEGER = encode_tlv(0x02, b"\x01" * 2000)


@pytest.mark.parametrize(
    ("content_type", "version", "problem"),
    [
        (HUGE_ARC_OID, encode_integer(1), "arc longer than"),
        (NON_MINIMAL_OID, encode_integer(1), "leading zero octet"),
        (encode_oid("1.2.840.113549.1.7.1"), HUGE_INTEGER, "INTEGER is longer than"),
    ],
    ids=["huge-arc", "non-minimal-arc", "huge-version"],
)
def test_hostile_values_are_refused_as_format_errors(content_type: bytes, version: bytes, problem: str) -> None:
    """A 3,000-octet OID arc or a 2,000-octet INTEGER is refused as a malformed signature or token:
    never a ValueError from printing a number of over 4,300 digits, nor minutes of decoding."""
    data = _signed_data_with(content_type, version)
    with pytest.raises(CmsFormatError, match=problem):
        check_unsigned_fields(data, "the signature")
    with pytest.raises(CmsFormatError):
        read_signed_data(data)
    with pytest.raises(TimestampError):
        parse_token(data)


def test_object_identifier_arcs_are_minimal_and_bounded() -> None:
    with pytest.raises(BerError, match="arc longer than 20 octets"):
        oid_from_content(b"\x2a" + b"\xff" * 3000 + b"\x7f")
    with pytest.raises(BerError, match="leading zero octet"):
        oid_from_content(b"\x2a\x80\x01")
    uuid_arc = "2.25.329800735698586629295641978511506172918"  # a 128-bit arc: 19 octets
    assert oid_from_content(encode_oid(uuid_arc)[2:]) == uuid_arc
