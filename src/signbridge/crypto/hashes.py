"""The hash algorithms signbridge signs with: names, OIDs, sizes and DigestInfo encodings."""

from __future__ import annotations

import enum
import hashlib

from cryptography.hazmat.primitives import hashes

from ..errors import SignatureError


class HashAlgorithm(enum.Enum):
    """A digest algorithm, with everything the signing paths need to know about it."""

    MD5 = ("md5", "1.2.840.113549.2.5", 16)
    SHA1 = ("sha1", "1.3.14.3.2.26", 20)
    SHA224 = ("sha224", "2.16.840.1.101.3.4.2.4", 28)
    SHA256 = ("sha256", "2.16.840.1.101.3.4.2.1", 32)
    SHA384 = ("sha384", "2.16.840.1.101.3.4.2.2", 48)
    SHA512 = ("sha512", "2.16.840.1.101.3.4.2.3", 64)

    def __init__(self, hashlib_name: str, oid: str, digest_size: int) -> None:
        self.hashlib_name = hashlib_name
        self.oid = oid
        self.digest_size = digest_size

    @property
    def title(self) -> str:
        """SignPath's spelling: ``Sha256``."""
        return self.hashlib_name.capitalize()

    def cryptography_hash(self) -> hashes.HashAlgorithm:
        return _CRYPTOGRAPHY[self]()

    def new(self, data: bytes = b"") -> hashlib._Hash:
        return hashlib.new(self.hashlib_name, data)

    def digest(self, data: bytes) -> bytes:
        return hashlib.new(self.hashlib_name, data).digest()

    def digest_info(self, digest: bytes) -> bytes:
        """The DER DigestInfo that RSA PKCS#1 v1.5 signs (RFC 8017 §9.2)."""
        self.check_digest(digest)
        return _DIGEST_INFO_PREFIX[self] + digest

    def check_digest(self, digest: bytes) -> None:
        if len(digest) != self.digest_size:
            raise SignatureError(
                f"a {self.title} hash is {self.digest_size} bytes long, but {len(digest)} bytes were given"
            )

    @classmethod
    def from_oid(cls, oid: str) -> HashAlgorithm:
        algorithm = _BY_OID.get(oid)
        if algorithm is None:
            raise SignatureError(f"unknown hash algorithm OID {oid!r}")
        return algorithm

    @classmethod
    def from_name(cls, name: str) -> HashAlgorithm:
        """Accepts ``sha256``, ``SHA-256``, ``Sha256`` and the like."""
        algorithm = _BY_NAME.get(name.replace("-", "").replace("_", "").lower())
        if algorithm is None:
            raise SignatureError(f"unknown hash algorithm {name!r}")
        return algorithm

    @classmethod
    def from_digest_info(cls, digest_info: bytes) -> tuple[HashAlgorithm, bytes]:
        """Split a DER DigestInfo into its algorithm and digest."""
        for algorithm, prefix in _DIGEST_INFO_PREFIX.items():
            if digest_info.startswith(prefix) and len(digest_info) == len(prefix) + algorithm.digest_size:
                return algorithm, digest_info[len(prefix) :]
        raise SignatureError("the data is not a DigestInfo of a supported hash algorithm")


_BY_OID = {algorithm.oid: algorithm for algorithm in HashAlgorithm}
_BY_NAME = {algorithm.hashlib_name: algorithm for algorithm in HashAlgorithm}

_CRYPTOGRAPHY = {
    HashAlgorithm.MD5: hashes.MD5,
    HashAlgorithm.SHA1: hashes.SHA1,
    HashAlgorithm.SHA224: hashes.SHA224,
    HashAlgorithm.SHA256: hashes.SHA256,
    HashAlgorithm.SHA384: hashes.SHA384,
    HashAlgorithm.SHA512: hashes.SHA512,
}

# DER of DigestInfo up to the digest bytes (RFC 8017 §9.2, note 1).
_DIGEST_INFO_PREFIX = {
    HashAlgorithm.MD5: bytes.fromhex("3020300c06082a864886f70d020505000410"),
    HashAlgorithm.SHA1: bytes.fromhex("3021300906052b0e03021a05000414"),
    HashAlgorithm.SHA224: bytes.fromhex("302d300d06096086480165030402040500041c"),
    HashAlgorithm.SHA256: bytes.fromhex("3031300d060960864801650304020105000420"),
    HashAlgorithm.SHA384: bytes.fromhex("3041300d060960864801650304020205000430"),
    HashAlgorithm.SHA512: bytes.fromhex("3051300d060960864801650304020305000440"),
}
