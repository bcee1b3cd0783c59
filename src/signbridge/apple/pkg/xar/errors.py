"""What can go wrong reading, building or re-signing a flat package (xar archive).

Each kind of damage has its own type so callers (``pkgutil --check-signature``, ``productsign``)
can word their verdicts; every message names the file and is written for a person at a terminal.
"""

from __future__ import annotations

from ....errors import SignatureError, SignbridgeError


class XarError(SignbridgeError):
    """A package could not be read, built or re-signed."""


class NotXarError(XarError):
    """The file does not start with the xar magic: it is not a flat package."""


class TruncatedXarError(XarError):
    """The file ends before its header, table of contents or heap does."""


class XarFormatError(XarError):
    """The header is malformed or of an unsupported version."""


class TocTooLargeError(XarError):
    """The table of contents inflates past the size signbridge is willing to read."""


class MalformedTocError(XarError):
    """The table of contents is not valid zlib data, not well-formed XML, or lacks a required element."""


class UnsafeTocError(MalformedTocError):
    """The table of contents declares a DTD or entities (entity-expansion and external-entity attacks)."""


class InvalidNumberError(MalformedTocError):
    """A number in the header or table of contents is negative, not a number, or too large."""


class DuplicateSignatureError(MalformedTocError):
    """The table of contents holds more than one signature element of a kind."""


class HeapRangeError(XarError):
    """An offset or size points outside the heap, or into the signature area."""


class ChecksumMismatchError(XarError):
    """A stored checksum does not match the data it covers (the package was altered or damaged)."""


class UnsupportedChecksumError(XarError):
    """The package uses a checksum algorithm signbridge cannot compute or will not sign with."""


class StapledTicketError(XarError):
    """The notarization ticket appended to the package is damaged."""


class SourceChangedError(XarError):
    """The input package changed between preparing the signature and writing the signed copy."""


class PackageBuildError(XarError):
    """The files given to the package writer cannot form a package."""


class SignatureSizeError(SignatureError):
    """A signature does not fit the space reserved for it in the package."""
