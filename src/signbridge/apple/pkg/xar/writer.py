"""Building an unsigned flat package (xar archive) from files.

Used to make component packages (``Bom``, ``PackageInfo``, ``Payload``, ``Scripts``) and product
archives (``Distribution``, ``Resources/…``, ``name.pkg/…``) for tests and the demo; signing is
a separate step (:mod:`.signing`). Heap layout: the TOC checksum at offset 0, then each file's
data in the order given. File data is streamed through a temporary heap file, so large payloads
are never held in memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from .errors import PackageBuildError, UnsupportedChecksumError
from .filedata import CHUNK, GZIP
from .header import pack_header
from .output import copy_range, package_output
from .toc import OCTET_STREAM
from .tocxml import Element, indent, make, serialize

TOC_CHECKSUMS = ("none", "sha1", "sha256", "sha512")
FILE_CHECKSUMS = ("sha1", "sha256", "sha512", "md5")


@dataclass(frozen=True)
class PackageEntry:
    """One member of a package. ``path`` uses "/" (``"app.pkg/Payload"``); missing parent directories
    are added. ``data`` is bytes, a file to read, or None for an (empty) directory. ``compress`` stores
    it zlib-compressed (``application/x-gzip``) instead of as is (``application/octet-stream``, right
    for a ``Payload`` that is already compressed)."""

    path: str
    data: bytes | Path | None = None
    compress: bool = True
    mode: int | None = None


def write_package(
    out_path: str | os.PathLike[str],
    entries: Iterable[PackageEntry],
    *,
    toc_checksum: str = "sha1",
    file_checksum: str = "sha1",
    mtime: datetime | None = None,
) -> Path:
    """Write an unsigned package to ``out_path`` (atomically) and return its path."""
    out_path = Path(out_path)
    if toc_checksum not in TOC_CHECKSUMS:
        raise UnsupportedChecksumError(f"the TOC checksum must be one of {', '.join(TOC_CHECKSUMS)}")
    if file_checksum not in FILE_CHECKSUMS:
        raise UnsupportedChecksumError(f"file checksums must be one of {', '.join(FILE_CHECKSUMS)}")
    stamp = (mtime or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    checksum_size = 0 if toc_checksum == "none" else hashlib.new(toc_checksum).digest_size

    toc = make("toc")
    toc.append(make("creation-time", stamp))
    if checksum_size:
        checksum = make("checksum", style=toc_checksum)
        checksum.extend([make("offset", "0"), make("size", str(checksum_size))])
        toc.append(checksum)
    tree = _Tree(toc, stamp)
    try:
        heap_file = tempfile.TemporaryFile(dir=out_path.parent)  # noqa: SIM115 - entered just below
    except OSError as e:
        raise PackageBuildError(f"cannot write to {out_path.parent}: {e.strerror}") from None
    with heap_file as heap:
        offset = checksum_size
        for entry in entries:
            parts = _split(entry.path)
            if entry.data is None:
                tree.directory(parts, entry.mode)
                continue
            element = tree.file(parts, entry.mode)
            length, data = _store(entry, heap, file_checksum, offset)
            element.append(data)
            offset += length
        root = make("xar")
        root.append(toc)
        indent(root, 0)
        toc_xml = serialize(root)
        toc_compressed = zlib.compress(toc_xml, 9)
        with package_output(out_path) as out:
            out.write(pack_header(len(toc_compressed), len(toc_xml), toc_checksum))
            out.write(toc_compressed)
            if checksum_size:
                out.write(hashlib.new(toc_checksum, toc_compressed).digest())
            heap.flush()
            copy_range(heap, out, 0, offset - checksum_size, out_path.name)
    return out_path


def _split(path: str) -> list[str]:
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\0" in part:
            raise PackageBuildError(f"{path!r} is not a valid path inside a package")
    return parts


class _Tree:
    """The <file> elements of the TOC, found by path."""

    def __init__(self, toc: Element, stamp: str) -> None:
        self._toc = toc
        self._stamp = stamp
        self._nodes: dict[tuple[str, ...], tuple[Element, str]] = {}

    def directory(self, parts: list[str], mode: int | None) -> Element:
        key = tuple(parts)
        if key in self._nodes:
            element, kind = self._nodes[key]
            if kind != "directory":
                raise PackageBuildError(f"{'/'.join(parts)!r} is both a file and a directory")
            return element
        return self._add(parts, "directory", 0o755 if mode is None else mode)

    def file(self, parts: list[str], mode: int | None) -> Element:
        if tuple(parts) in self._nodes:
            raise PackageBuildError(f"{'/'.join(parts)!r} appears twice in the package")
        return self._add(parts, "file", 0o644 if mode is None else mode)

    def _add(self, parts: list[str], kind: str, mode: int) -> Element:
        parent = self.directory(parts[:-1], None) if len(parts) > 1 else self._toc
        element = make("file", id=str(len(self._nodes) + 1))
        fields = [("name", parts[-1]), ("type", kind), ("mode", f"{mode:04o}"), ("uid", "0"), ("user", "root")]
        fields += [("gid", "0"), ("group", "wheel"), ("mtime", self._stamp)]
        element.extend(make(tag, text) for tag, text in fields)
        parent.append(element)
        self._nodes[tuple(parts)] = (element, kind)
        return element


def _store(entry: PackageEntry, heap: BinaryIO, checksum: str, offset: int) -> tuple[int, Element]:
    """Append the entry's data to the heap; returns the stored length and its <data> element."""
    archived, extracted = hashlib.new(checksum), hashlib.new(checksum)
    compressor = zlib.compressobj(9) if entry.compress else None
    size = length = 0

    def put(stored: bytes) -> None:
        nonlocal length
        archived.update(stored)
        heap.write(stored)
        length += len(stored)

    for chunk in _chunks(entry.data):
        size += len(chunk)
        extracted.update(chunk)
        put(compressor.compress(chunk) if compressor else chunk)
    if compressor:
        put(compressor.flush())
    data = make("data")
    data.extend([make("length", str(length)), make("offset", str(offset)), make("size", str(size))])
    data.append(make("encoding", style=GZIP if compressor else OCTET_STREAM))
    data.append(make("archived-checksum", archived.hexdigest(), style=checksum))
    data.append(make("extracted-checksum", extracted.hexdigest(), style=checksum))
    return length, data


def _chunks(data: bytes | Path) -> Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])
        return
    try:
        with open(data, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    except OSError as e:
        raise PackageBuildError(f"cannot read {data}: {e.strerror}") from None
