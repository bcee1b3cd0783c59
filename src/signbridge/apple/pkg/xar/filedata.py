"""A file's heap data checked against its checksums: decoded and streamed (:func:`copy_file_data`), or,
while the stored bytes are copied elsewhere, checked against the archived checksum alone
(:class:`StoredChecksum`, what libxar itself compares when it reads a file out of the heap)."""

from __future__ import annotations

import bz2
import hashlib
import hmac
import lzma
import zlib
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from .errors import ChecksumMismatchError, TruncatedXarError, UnsupportedChecksumError, XarError
from .toc import OCTET_STREAM, FileChecksum, FileData, XarFile

CHUNK = 1024 * 1024
GZIP = "application/x-gzip"  # xar's "gzip" is a zlib stream
BZIP2 = "application/x-bzip2"
LZMA = ("application/x-lzma", "application/x-xz")


def copy_file_data(source: BinaryIO, heap_offset: int, entry: XarFile, out: BinaryIO, name: str) -> int:
    """Write ``entry``'s decoded bytes to ``out``; returns how many. ``name`` names the package in errors."""
    data = entry.data
    if data is None or (data.length == 0 and data.size == 0):  # some writers store empty files as nothing
        return 0
    where = f"{name}: {entry.path!r}"
    archived = _hasher(data.archived_checksum, where)
    # stored as is, with both checksums of one style: one hash serves both
    shared = (
        archived is not None
        and data.encoding.lower() == OCTET_STREAM
        and data.extracted_checksum is not None
        and data.extracted_checksum.style == data.archived_checksum.style
    )
    extracted = None if shared else _hasher(data.extracted_checksum, where)
    source.seek(heap_offset + data.offset)
    stored = _read_chunks(source, data.length, where)
    if archived:
        stored = _hashing(stored, archived)
    written = 0
    for piece in _decode(stored, data.encoding, where):
        written += len(piece)
        if written > data.size:
            raise ChecksumMismatchError(f"{where} decodes to more than the {data.size} bytes the table of contents gives")
        if extracted:
            extracted.update(piece)
        out.write(piece)
    if written != data.size:
        raise ChecksumMismatchError(f"{where} decodes to {written} bytes, but the table of contents gives {data.size}")
    _compare(archived, data.archived_checksum, f"{where}: the stored data")
    _compare(archived if shared else extracted, data.extracted_checksum, f"{where}: the contents")
    return written


class StoredChecksum:
    """A running check of one file's stored bytes, fed in order as they stream past; ``start`` and
    ``end`` are offsets in the package file.

    The stored bytes are checked against the ``<archived-checksum>``, as libxar compares them when it
    reads a file out of the heap (its extracted-checksum hash is computed there but never compared).
    A file stored as is (``application/octet-stream``) with an ``<extracted-checksum>`` only is
    checked against that, its stored bytes being its contents.
    """

    def __init__(self, path: str, data: FileData, checksum: FileChecksum, start: int, name: str) -> None:
        self.path = path
        self.start = start
        self.end = start + data.length
        self.kind = "archived" if checksum is data.archived_checksum else "extracted"
        self._expected = checksum
        self._hasher = _hasher(checksum, f"{name}: {path!r}")
        self._name = name

    def update(self, chunk: memoryview, offset: int) -> None:
        """Feed the part of ``chunk`` (the package's bytes from file offset ``offset``) that is this file's."""
        first = max(self.start, offset) - offset
        last = min(self.end, offset + len(chunk)) - offset
        if first < last:
            self._hasher.update(chunk[first:last])

    def verify(self) -> None:
        """Raise :class:`ChecksumMismatchError` naming the file unless every byte fed matches."""
        computed = self._hasher.digest()
        if not hmac.compare_digest(computed, self._expected.digest):
            raise ChecksumMismatchError(
                f"{self._name}: the stored data of {self.path!r} does not match its {self.kind} "
                f"{self._expected.style} checksum (the table of contents gives {self._expected.digest.hex()}, the "
                f"data hashes to {computed.hex()}); the package was altered or damaged"
            )


def stored_checksums(files: Iterable[XarFile], heap_offset: int, name: str) -> list[StoredChecksum]:
    """The checks of every file's stored bytes (see :class:`StoredChecksum`), in the order of their data.

    Files without data, with no bytes stored, or without a checksum that covers the stored bytes
    have nothing to check. An unknown checksum style raises :class:`UnsupportedChecksumError`.
    """
    checks = []
    for entry in files:
        data = entry.data
        if data is None or data.length == 0:
            continue
        checksum = data.archived_checksum
        if checksum is None and data.encoding.lower() == OCTET_STREAM:
            checksum = data.extracted_checksum
        if checksum is None or checksum.style in ("", "none"):
            continue
        checks.append(StoredChecksum(entry.path, data, checksum, heap_offset + data.offset, name))
    return sorted(checks, key=lambda check: check.start)


def _read_chunks(source: BinaryIO, length: int, where: str) -> Iterator[bytes]:
    remaining = length
    while remaining:
        try:
            chunk = source.read(min(CHUNK, remaining))
        except OSError as e:
            raise XarError(f"{where}: cannot read the package ({e.strerror})") from None
        if not chunk:
            raise TruncatedXarError(f"{where}: the package ends inside this file's data")
        remaining -= len(chunk)
        yield chunk


def _hashing(chunks: Iterator[bytes], hasher) -> Iterator[bytes]:  # noqa: ANN001 - a hashlib object
    for chunk in chunks:
        hasher.update(chunk)
        yield chunk


def _decode(chunks: Iterator[bytes], encoding: str, where: str) -> Iterator[bytes]:
    kind = encoding.lower()
    if kind == OCTET_STREAM:
        yield from chunks
        return
    if kind == GZIP:
        pieces = _inflate(chunks, where)
    elif kind == BZIP2:
        pieces = _decompress(chunks, bz2.BZ2Decompressor(), where)
    elif kind in LZMA:
        pieces = _decompress(chunks, lzma.LZMADecompressor(), where)
    else:
        raise XarError(f"{where} is stored as {encoding!r}, which signbridge cannot decode")
    try:
        yield from pieces
    except (zlib.error, OSError, EOFError, lzma.LZMAError) as e:  # bz2 reports bad data as OSError
        raise ChecksumMismatchError(f"{where} cannot be decompressed ({e})") from None


def _inflate(chunks: Iterator[bytes], where: str) -> Iterator[bytes]:
    inflater = zlib.decompressobj(47)  # zlib, or gzip with a header
    for chunk in chunks:
        data = chunk
        while data and not inflater.eof:
            yield inflater.decompress(data, CHUNK)
            data = inflater.unconsumed_tail
    yield inflater.flush()  # at most what zlib holds back after consuming all input: < one window
    if not inflater.eof:
        raise ChecksumMismatchError(f"{where}: the data ends before its compressed stream does")


def _decompress(chunks: Iterator[bytes], decompressor, where: str) -> Iterator[bytes]:  # noqa: ANN001
    for chunk in chunks:
        if decompressor.eof:
            continue  # bytes after the stream still count for the archived checksum
        yield decompressor.decompress(chunk, CHUNK)
        while not decompressor.eof and not decompressor.needs_input:
            yield decompressor.decompress(b"", CHUNK)
    if not decompressor.eof:
        raise ChecksumMismatchError(f"{where}: the data ends before its compressed stream does")


def _hasher(checksum: FileChecksum | None, where: str):  # noqa: ANN202 - a hashlib object
    if checksum is None or checksum.style in ("", "none"):
        return None
    try:
        return hashlib.new(checksum.style)
    except ValueError:
        raise UnsupportedChecksumError(
            f"{where} has a {checksum.style!r} checksum, which signbridge cannot compute"
        ) from None


def _compare(hasher, expected: FileChecksum | None, what: str) -> None:  # noqa: ANN001 - a hashlib object
    if hasher is None or expected is None:
        return
    if not hmac.compare_digest(hasher.digest(), expected.digest):
        raise ChecksumMismatchError(f"{what} does not match its {expected.style} checksum; the package is damaged")
