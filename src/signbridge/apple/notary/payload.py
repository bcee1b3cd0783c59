"""Reading a component package's ``Payload`` and archives found in bundles, within limits.

A Payload is a cpio archive (odc, as pkgbuild writes it), compressed with gzip or, in Apple's own
packages, with pbzx (a chunked xz stream). signbridge decompresses it itself, counting every
byte, and hands the cpio stream to libarchive (python ``libarchive-c``) to read the entries.
Zip and jar archives are read with the standard library; the file system in a disk image with
7-Zip, after its listing was checked against the same limits.

Everything is bounded: the bytes written out and the number of entries stop at
:class:`Limits`; an entry whose path would land outside the destination is refused; symbolic
links are created only when they point inside the destination, and nothing is written through
a link; hard links and devices are not created; AppleDouble ``._`` entries (extended attributes
pkgbuild stores beside a file) are metadata, not files, and are skipped.
"""

from __future__ import annotations

import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import libarchive
import libarchive.exception

from ..bundle.ipa import zip_errors
from .errors import PayloadError

APPLE_DOUBLE_MAGIC = b"\x00\x05\x16\x07"
_CHUNK = 1024 * 1024
_BLOCK = 64 * 1024  # what libarchive asks for at a time
_XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 8 * 1024 * 1024 * 1024
    max_entries: int = 500_000


class _Budget:
    def __init__(self, limits: Limits, name: str) -> None:
        self.limits = limits
        self.name = name
        self.bytes = 0
        self.entries = 0

    def spend(self, count: int) -> None:
        self.bytes += count
        if self.bytes > self.limits.max_bytes:
            raise PayloadError(
                f"{self.name} expands to more than {self.limits.max_bytes} bytes; refusing to read further"
            )

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise PayloadError(f"{self.name} has more than {self.limits.max_entries} entries; refusing to read further")


class _Decompressed(io.RawIOBase):
    """The decompressed bytes of a gzip, pbzx or plain stream, charged to a budget as they come."""

    def __init__(self, source: BinaryIO, budget: _Budget) -> None:
        self.source = source
        self.budget = budget
        self.pending = memoryview(b"")
        self.position = 0  # of the next byte of ``pending`` to hand out
        self.failure: PayloadError | None = None  # libarchive calls readinto from C: errors are kept here
        start = source.read(6)
        if start[:2] == b"\x1f\x8b":
            self.chunks = self._gzip(start)
        elif start[:4] == b"pbzx":
            self.chunks = self._pbzx(start)
        else:
            self.chunks = self._plain(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while self.position == len(self.pending):
            if self.failure is not None:
                return 0
            try:
                chunk = next(self.chunks, None)
                if chunk is None:
                    return 0
                self.budget.spend(len(chunk))
            except PayloadError as exc:
                self.failure = exc
                return 0
            self.pending, self.position = memoryview(chunk), 0
        # libarchive reads a few kilobytes at a time: hand out the chunk from a moving position (each
        # read copies only what it returns, never the rest of the chunk)
        target = memoryview(buffer).cast("B")  # libarchive-c passes a ctypes array: copy through its buffer
        count = min(len(target), len(self.pending) - self.position)
        target[:count] = self.pending[self.position : self.position + count]
        self.position += count
        return count

    def _plain(self, start: bytes) -> Iterator[bytes]:
        yield start
        while data := self.source.read(_CHUNK):
            yield data

    def _gzip(self, start: bytes) -> Iterator[bytes]:
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
        data = start + self.source.read(_CHUNK)
        try:
            while data:
                while data:
                    yield inflater.decompress(data, _CHUNK)
                    data = inflater.unconsumed_tail
                    if inflater.eof:
                        return
                data = self.source.read(_CHUNK)
            yield inflater.flush()
        except zlib.error as exc:
            raise PayloadError(f"{self.budget.name} is not valid gzip data ({exc})") from None

    def _pbzx(self, start: bytes) -> Iterator[bytes]:
        header = start + self.source.read(12 - len(start))
        if len(header) < 12:
            raise PayloadError(f"{self.budget.name}: the pbzx header is truncated")
        while True:
            chunk_header = self.source.read(16)
            if not chunk_header:
                return
            if len(chunk_header) < 16:
                raise PayloadError(f"{self.budget.name}: a pbzx chunk header is truncated")
            _flags, length = struct.unpack(">QQ", chunk_header)
            if length > 64 * 1024 * 1024:
                raise PayloadError(f"{self.budget.name}: a pbzx chunk claims {length} bytes")
            data = self.source.read(length)
            if len(data) != length:
                raise PayloadError(f"{self.budget.name}: a pbzx chunk is truncated")
            if not data.startswith(_XZ_MAGIC):
                yield data
                continue
            decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            try:
                while not decompressor.eof:
                    out = decompressor.decompress(data, _CHUNK)
                    data = b""
                    if not out and decompressor.needs_input:
                        raise PayloadError(f"{self.budget.name}: a pbzx chunk's xz data ends early")
                    yield out
            except lzma.LZMAError as exc:
                raise PayloadError(f"{self.budget.name}: a pbzx chunk is not valid xz data ({exc})") from None


def _text(name: str | bytes | None) -> str:
    """A name from libarchive, which gives the bytes when they are not UTF-8: the same bytes as a
    file-system name (``surrogateescape``, as Python spells the names ``os.listdir`` returns)."""
    if isinstance(name, bytes):
        return name.decode("utf-8", "surrogateescape")
    return name or ""


def _safe_target(destination: Path, name: str, archive_name: str) -> Path | None:
    """Where ``name`` goes under ``destination``; None for the root itself; refuses escapes."""
    pure = PurePosixPath(name)
    parts = [part for part in pure.parts if part not in ("", ".")]
    if name.startswith("/") or ".." in parts or any("\x00" in part for part in parts):
        raise PayloadError(f"{archive_name}: the entry {name!r} would be written outside the archive's root; refusing it")
    if not parts:
        return None
    return destination.joinpath(*parts)


def _symlink(destination: Path, target: Path, link: str, archive_name: str) -> None:
    """Create a symbolic link only when what it points at stays inside ``destination``."""
    pointed = os.path.normpath(os.path.join(os.path.dirname(target), link))
    if os.path.isabs(link) or not Path(pointed).is_relative_to(destination):
        raise PayloadError(f"{archive_name}: the link {target.name} -> {link!r} points outside the archive's root")
    _check_parent(destination, target, archive_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        raise PayloadError(f"{archive_name}: {target.name} appears twice")
    os.symlink(link, target)


def _check_parent(destination: Path, target: Path, archive_name: str) -> None:
    """Refuse a write through a symbolic link that leads out of ``destination``."""
    if not target.parent.resolve().is_relative_to(destination.resolve()) or target.is_symlink():
        raise PayloadError(f"{archive_name}: {target.name} would be written outside the archive's root")


def _write_entry(target: Path, blocks: Iterable[bytes], mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as out:
        for block in blocks:
            out.write(block)
    os.chmod(target, (mode & 0o755) | 0o600)


def extract_cpio(source: BinaryIO, destination: Path, limits: Limits, name: str) -> int:
    """Extract a (compressed) cpio archive's directories and regular files; returns the file count."""
    destination = destination.resolve()
    budget = _Budget(limits, name)
    stream = _Decompressed(source, budget)
    written = 0
    try:
        with libarchive.stream_reader(stream, format_name="cpio", filter_name="none", block_size=_BLOCK) as archive:
            for entry in archive:
                budget.entry()
                target = _safe_target(destination, _text(entry.pathname), name)
                if target is None:
                    continue
                if entry.isdir:
                    _check_parent(destination, target, name)
                    target.mkdir(parents=True, exist_ok=True)
                elif entry.issym:
                    _symlink(destination, target, _text(entry.linkpath), name)
                elif entry.isreg and not entry.islnk:
                    _check_parent(destination, target, name)
                    blocks = entry.get_blocks()
                    if target.name.startswith("._"):
                        first = next(iter(blocks), b"")
                        if first[:4] == APPLE_DOUBLE_MAGIC:
                            continue
                        blocks = [first, *blocks]
                    _write_entry(target, blocks, entry.mode)
                    written += 1
    except libarchive.exception.ArchiveError as exc:
        if stream.failure is not None:
            raise stream.failure from None
        raise PayloadError(f"{name} is not a readable cpio archive: {exc}") from None
    except OSError as exc:  # an entry names a path twice, or as a file and a folder
        raise PayloadError(f"{name}: an entry cannot be extracted ({exc.strerror or exc}: {exc.filename})") from None
    if stream.failure is not None:
        raise stream.failure
    return written


def extract_zip(path: Path, destination: Path, limits: Limits, name: str) -> int:
    """Extract a zip (or jar) archive's directories and regular files; returns the file count."""
    destination = destination.resolve()
    budget = _Budget(limits, name)
    written = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                budget.entry()
                target = _safe_target(destination, info.filename, name)
                if target is None:
                    continue
                kind = stat.S_IFMT(info.external_attr >> 16)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if kind == stat.S_IFLNK and info.file_size <= 4096:
                    _symlink(destination, target, archive.read(info).decode("utf-8", "replace"), name)
                    continue
                if kind not in (0, stat.S_IFREG):
                    continue  # devices and oversized links are not created
                _check_parent(destination, target, name)
                with archive.open(info) as member:
                    _write_entry(target, _counted(member, budget), (info.external_attr >> 16) or 0o644)
                written += 1
    except zip_errors() as exc:
        raise PayloadError(f"{name} is not a readable zip archive: {exc}") from None
    return written


def _counted(member: BinaryIO, budget: _Budget) -> Iterator[bytes]:
    while data := member.read(_CHUNK):
        budget.spend(len(data))
        yield data


def _seven_zip() -> str:
    found = shutil.which("7zz") or shutil.which("7z")
    if found is None:
        raise PayloadError("reading the files in a disk image needs 7-Zip (the Debian package 7zip)")
    return found


def extract_disk_image(path: Path, destination: Path, limits: Limits, name: str) -> int:
    """Extract the files of a disk image's file system (HFS+, APFS, FAT) with 7-Zip, after checking
    its listing against the limits and the paths; extended attributes are not extracted."""
    destination = destination.resolve()
    seven = _seven_zip()
    listing = subprocess.run(
        [seven, "l", "-slt", "-ba", "-sns-", str(path)], capture_output=True, text=True, timeout=600, check=False
    )
    if listing.returncode != 0:
        raise PayloadError(f"{name}: 7-Zip cannot read the disk image's file system ({listing.stderr.strip()[:200]})")
    budget = _Budget(limits, name)
    files = 0
    for block in listing.stdout.split("\n\n"):
        fields = dict(line.split(" = ", 1) for line in block.splitlines() if " = " in line)
        if "Path" not in fields or fields.get("Alternate Stream") == "+":
            continue
        budget.entry()
        _safe_target(destination, fields["Path"], name)
        if fields.get("Folder") != "+":
            files += 1
            budget.spend(int(fields.get("Size") or 0))
    extracted = subprocess.run(
        [seven, "x", "-snl", "-sns-", "-y", f"-o{destination}", str(path)],
        capture_output=True, text=True, timeout=3600, check=False,
    )
    if extracted.returncode != 0:
        raise PayloadError(f"{name}: 7-Zip could not extract the disk image ({extracted.stderr.strip()[:200]})")
    return files
