"""Reading a xar archive (flat package): header, table of contents, heap, stapled ticket.

File layout::

    header (28 bytes) | zlib-compressed TOC | heap ……………………………… | [stapled notarization ticket]

``stapler`` appends a ticket as three parts, all little-endian: a 16-byte ``t8lr`` record of type 1
(where the ticket starts), the ticket, and a 16-byte ``t8lr`` record of type 2 holding the
ticket's length (``'t8lr' u16 version u16 type u32 length u32 0``). The package's own bytes are
unchanged, so the ticket is found from the end of the file; it is not part of the heap.

The heap holds, at the offsets the TOC gives, the TOC checksum, the signatures and the files'
data. Opening an archive reads the header and TOC only (a bounded amount of memory, however big
the package); file data is read on demand and streamed.

Everything read is checked: lengths against the file, numbers against overflow, the TOC's
inflated size against the size its header declares and a limit, its XML against DTDs/entities,
every heap range against the heap, and (unless asked not to) the stored TOC checksum against a
fresh hash of the compressed TOC.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ....crypto.hashes import HashAlgorithm
from .errors import (
    ChecksumMismatchError,
    HeapRangeError,
    MalformedTocError,
    SourceChangedError,
    StapledTicketError,
    TocTooLargeError,
    TruncatedXarError,
    XarError,
)
from .filedata import copy_file_data
from .header import HEADER_SIZE, XarHeader, declared_header_size, parse_header
from .toc import HeapRange, Toc, XarFile, parse_toc

# A package's TOC lists its top-level parts (Bom, Payload, Scripts, Distribution, resources): a
# few kilobytes. Parsing is linear in the TOC's size, about a second for 4 MiB of XML; a TOC
# compresses a thousandfold, so this bound, not the file's size, is what bounds the work.
TOC_SIZE_LIMIT = 4 * 1024 * 1024
_CHUNK = 1024 * 1024

TICKET_MAGIC = b"t8lr"
_TRAILER = struct.Struct("<4sHHII")  # magic, version, type, length, unused (little-endian)
_TRAILER_TERMINATOR = 1
_TRAILER_TICKET = 2


@dataclass(frozen=True)
class StapledTicket:
    """A notarization ticket appended after the heap: start record, ticket, trailer record."""

    offset: int  # file offset of the start record: where the xar proper ends
    ticket_length: int

    @property
    def ticket_offset(self) -> int:
        return self.offset + _TRAILER.size


@dataclass(frozen=True)
class FileIdentity:
    """Enough of ``stat`` to notice that a file was replaced or rewritten."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class XarArchive:
    path: Path
    identity: FileIdentity
    header: XarHeader
    toc_compressed: bytes = field(repr=False)
    toc_xml: bytes = field(repr=False)
    toc: Toc = field(repr=False)
    heap_offset: int  # file offset of heap byte 0
    heap_size: int  # up to the stapled ticket, or the end of the file
    stapled_ticket: StapledTicket | None

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, verify_checksum: bool = True, toc_size_limit: int = TOC_SIZE_LIMIT
    ) -> XarArchive:
        """Read and check a package's header and TOC.

        Raises a :class:`XarError` subclass naming what is wrong; with ``verify_checksum`` (the
        default) that includes :class:`ChecksumMismatchError` when the stored TOC checksum is not
        the hash of the compressed TOC.
        """
        path = Path(path)
        name = str(path)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, after fstat
        except OSError as e:
            raise XarError(f"cannot open {name}: {e.strerror}") from None
        with f:
            identity = FileIdentity.of(os.fstat(f.fileno()))
            start = f.read(HEADER_SIZE)
            start += f.read(max(0, declared_header_size(start) - HEADER_SIZE))
            header = parse_header(start, name)
            if header.toc_length_uncompressed > toc_size_limit or header.toc_length_compressed > toc_size_limit:
                raise TocTooLargeError(
                    f"{name}: the table of contents is {header.toc_length_uncompressed} bytes "
                    f"({header.toc_length_compressed} compressed), more than the {toc_size_limit} signbridge reads"
                )
            heap_offset = header.size + header.toc_length_compressed
            if heap_offset > identity.size:
                raise TruncatedXarError(
                    f"{name} ends inside its table of contents ({identity.size} bytes; the TOC ends at byte "
                    f"{heap_offset})"
                )
            toc_compressed = _read_exactly(f, header.toc_length_compressed, name)
            toc_xml = _inflate_toc(toc_compressed, min(toc_size_limit, header.toc_length_uncompressed), name)
            toc = parse_toc(toc_xml, name)
            ticket = _find_stapled_ticket(f, heap_offset, identity.size, name)
            if ticket is None:
                _refuse_cut_ticket(f, heap_offset + _used_heap_end(toc), identity.size, name)
        heap_end = ticket.offset if ticket else identity.size
        archive = cls(path, identity, header, toc_compressed, toc_xml, toc, heap_offset, heap_end - heap_offset, ticket)
        archive._check_checksum_style()
        archive._check_ranges()
        if verify_checksum:
            archive.verify_toc_checksum()
        return archive

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def checksum_algorithm(self) -> HashAlgorithm | None:
        """The TOC checksum algorithm, or None for an unchecksummed archive."""
        if self.header.checksum_name == "none":
            return None
        return HashAlgorithm.from_name(self.header.checksum_name)

    def compute_toc_checksum(self) -> bytes | None:
        algorithm = self.checksum_algorithm
        return algorithm.digest(self.toc_compressed) if algorithm else None

    def stored_toc_checksum(self) -> bytes | None:
        return self.read_heap(self.toc.checksum.heap_range) if self.toc.checksum else None

    def toc_checksum_matches(self) -> bool:
        computed = self.compute_toc_checksum()
        if computed is None:
            return self.toc.checksum is None
        stored = self.stored_toc_checksum()
        return stored is not None and hmac.compare_digest(stored, computed)

    def verify_toc_checksum(self) -> None:
        """Raise :class:`ChecksumMismatchError` unless the stored TOC checksum is the hash of the TOC."""
        if not self.toc_checksum_matches():
            raise ChecksumMismatchError(
                f"{self.name}: the table of contents does not match its checksum; the package was altered "
                "or damaged"
            )

    def read_heap(self, heap_range: HeapRange) -> bytes:
        """A small range of the heap (a checksum or signature); ranges were checked on open."""
        with self.reopen() as f:
            f.seek(self.heap_offset + heap_range.offset)
            return _read_exactly(f, heap_range.length, self.name)

    def read_ticket(self) -> bytes | None:
        """The stapled notarization ticket's bytes (see :mod:`signbridge.apple.notary.ticket`), or None."""
        ticket = self.stapled_ticket
        if ticket is None:
            return None
        with self.reopen() as f:
            f.seek(ticket.ticket_offset)
            return _read_exactly(f, ticket.ticket_length, self.name)

    def file(self, path: str) -> XarFile:
        for entry in self.toc.files:
            if entry.path == path:
                return entry
        raise XarError(f"{self.name} has no file {path!r}")

    def copy_data(self, entry: XarFile, out: BinaryIO) -> int:
        """Stream a file's decoded bytes into ``out``, checking its size and checksums; returns the size."""
        with self.reopen() as f:
            return copy_file_data(f, self.heap_offset, entry, out, self.name)

    def read_data(self, entry: XarFile) -> bytes:
        """A file's decoded bytes in memory (small files: Distribution, PackageInfo)."""
        buffer = io.BytesIO()
        self.copy_data(entry, buffer)
        return buffer.getvalue()

    def reopen(self) -> BinaryIO:
        """The package opened again for reading, refusing a file that changed since :meth:`open`."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - returned to the caller's with-block
        except OSError as e:
            raise XarError(f"cannot open {self.name}: {e.strerror}") from None
        if FileIdentity.of(os.fstat(f.fileno())) != self.identity:
            f.close()
            raise SourceChangedError(f"{self.name} changed after it was read; run the command again")
        return f

    def _check_checksum_style(self) -> None:
        header_style = self.header.checksum_name
        slot = self.toc.checksum
        if header_style == "none":
            if slot is not None and slot.style not in ("", "none"):
                raise ChecksumMismatchError(
                    f"{self.name}: the header says the TOC has no checksum, but the TOC has a {slot.style} one; "
                    "the header was altered"
                )
            if self.toc.signatures:
                raise ChecksumMismatchError(
                    f"{self.name} is signed but its TOC has no checksum; the header was altered"
                )
            return
        if slot is None:
            raise MalformedTocError(f"{self.name}: the header names a {header_style} TOC checksum but the TOC has none")
        if slot.style != header_style:
            raise ChecksumMismatchError(
                f"{self.name}: the header says the TOC checksum is {header_style} but the TOC says {slot.style!r}; "
                "the package was altered"
            )
        expected = hashlib.new(header_style).digest_size
        if slot.size != expected:
            raise MalformedTocError(
                f"{self.name}: the {header_style} TOC checksum is {expected} bytes, but the TOC reserves {slot.size}"
            )

    def _check_ranges(self) -> None:
        for what, heap_range in self.toc.heap_ranges():
            if heap_range.end > self.heap_size:
                raise HeapRangeError(
                    f"{self.name}: {what} lies outside the heap (bytes {heap_range.offset}..{heap_range.end} "
                    f"of a {self.heap_size}-byte heap); the package is truncated or altered"
                )


def _read_exactly(f: BinaryIO, length: int, name: str) -> bytes:
    data = f.read(length)
    if len(data) != length:
        raise TruncatedXarError(f"{name} is truncated: {length} bytes were expected at byte {f.tell() - len(data)}")
    return data


def _inflate_toc(compressed: bytes, limit: int, name: str) -> bytes:
    """The TOC's XML, inflating no more than ``limit`` bytes (the size the header declares)."""
    inflater = zlib.decompressobj()
    parts: list[bytes] = []
    total = 0
    data = compressed
    try:
        while not inflater.eof:
            part = inflater.decompress(data, _CHUNK)
            total += len(part)
            if total > limit:
                raise TocTooLargeError(
                    f"{name}: the table of contents inflates to more than {limit} bytes (the size its header "
                    "declares, within signbridge's limit); refusing to read it"
                )
            parts.append(part)
            data = inflater.unconsumed_tail
            if not part and not data:
                break
    except zlib.error as e:
        raise MalformedTocError(f"{name}: the table of contents is not valid zlib data ({e})") from None
    if not inflater.eof:
        raise TruncatedXarError(f"{name}: the compressed table of contents ends early")
    if inflater.unused_data:
        raise MalformedTocError(f"{name}: bytes follow the end of the compressed table of contents")
    return b"".join(parts)


def _find_stapled_ticket(f: BinaryIO, heap_offset: int, file_size: int, name: str) -> StapledTicket | None:
    size = _TRAILER.size
    if file_size - heap_offset < size:
        return None
    f.seek(file_size - size)
    magic, _version, kind, length, _ = _TRAILER.unpack(f.read(size))
    if magic != TICKET_MAGIC:
        return None
    if kind != _TRAILER_TICKET:
        raise StapledTicketError(
            f"{name} ends with a 't8lr' record of type {kind} where the notarization ticket's trailer (type "
            f"{_TRAILER_TICKET}) belongs; the stapled ticket is cut short or damaged"
        )
    room = file_size - heap_offset - 2 * size
    if length > room:
        raise StapledTicketError(
            f"{name}: the stapled notarization ticket's trailer gives a length of {length} bytes, more than the "
            f"{max(room, 0)} bytes between the table of contents and the trailer; the file is truncated or damaged"
        )
    start = file_size - 2 * size - length
    f.seek(start)
    magic, _version, kind, _length, _ = _TRAILER.unpack(f.read(size))
    if magic != TICKET_MAGIC or kind != _TRAILER_TERMINATOR:
        raise StapledTicketError(
            f"{name}: the stapled notarization ticket's start record is missing at byte {start}, where its "
            f"trailer's length of {length} bytes puts it; the ticket is damaged"
        )
    return StapledTicket(start, length)


def _used_heap_end(toc: Toc) -> int:
    return max((heap_range.end for _, heap_range in toc.heap_ranges()), default=0)


def _refuse_cut_ticket(f: BinaryIO, position: int, file_size: int, name: str) -> None:
    """A ticket start record right after the heap's data, but no trailer at the end: a cut-off ticket."""
    if position + len(TICKET_MAGIC) > file_size:
        return
    f.seek(position)
    if f.read(len(TICKET_MAGIC)) == TICKET_MAGIC:
        raise StapledTicketError(
            f"{name}: a notarization ticket is stapled at byte {position} but the file ends before its trailer; "
            "the file is truncated"
        )


@dataclass(frozen=True)
class SignatureData:
    """What a package's signatures sign and hold, as stored."""

    checksum_algorithm: HashAlgorithm | None
    checksum: bytes | None  # the TOC checksum stored in the heap
    checksum_matches: bool  # ... and whether it is the hash of the stored compressed TOC
    rsa_signature: bytes | None  # the <signature> slot (style "RSA")
    cms: bytes | None  # the whole <x-signature> slot: a CMS possibly followed by zero padding
    certificates: tuple[bytes, ...]  # KeyInfo of the x-signature, else of the signature (DER, leaf first)


def signature_data(archive: XarArchive) -> SignatureData:
    toc = archive.toc
    slot = toc.x_signature or toc.signature
    return SignatureData(
        checksum_algorithm=archive.checksum_algorithm,
        checksum=archive.stored_toc_checksum(),
        checksum_matches=archive.toc_checksum_matches(),
        rsa_signature=archive.read_heap(toc.signature.heap_range) if toc.signature else None,
        cms=archive.read_heap(toc.x_signature.heap_range) if toc.x_signature else None,
        certificates=slot.certificates if slot else (),
    )
