"""Disk images for the tests, made and read by tools that are not signbridge's.

Images are written by pydmg (PyPI; a Rust UDIF writer built on the ``apple-dmg`` crate: MBR,
FAT32, zlib chunks) and read back by 7-Zip (Debian ``7zip``: ``7zz l`` lists, ``7zz t`` checks the
chunk checksums). The trailer and the SuperBlob are walked with struct, the hashes recomputed
with hashlib: nothing here uses signbridge's own parsing.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pydmg

from codesignkit import cd_fields
from conftest import require_tool, run

SIGNATURE_FIELDS = slice(296, 312)


def write_payload(directory: Path) -> Path:
    """A small folder to put in an image: text, a binary and a subfolder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Readme.txt").write_text("A disk image made by pydmg for signbridge's tests.\n")
    (directory / "data").mkdir(exist_ok=True)
    (directory / "data" / "payload.bin").write_bytes(hashlib.sha256(b"seed").digest() * 4096)
    return directory


def make_image(directory: Path, name: str = "Sample.dmg", *, label: str = "SAMPLE") -> Path:
    """A UDIF image of :func:`write_payload`'s folder, written by pydmg."""
    source = write_payload(directory / f"{name}.payload")
    output = directory / name
    pydmg.create_dmg(source_dir=source, output_path=output, volume_label=label, total_sectors=16384)
    shutil.rmtree(source)
    return output


def sevenzip_listing(path: Path) -> list[tuple[str, int]]:
    """(path, size) of every file 7-Zip finds in the image's file system (``7zz l -slt``)."""
    output = run([require_tool("7zz"), "l", "-slt", "-ba", str(path)], text=True).stdout
    entries, current = [], {}
    for line in [*output.splitlines(), ""]:
        if not line.strip():
            if current.get("Path") and current.get("Folder") == "-":
                entries.append((current["Path"], int(current.get("Size") or 0)))
            current = {}
            continue
        key, _, value = line.partition(" = ")
        current[key] = value
    return sorted(entries)


def sevenzip_test(path: Path) -> str:
    """``7zz t``: 7-Zip decompresses every chunk and checks its checksum; its output."""
    return run([require_tool("7zz"), "t", str(path)], text=True).stdout


@dataclass(frozen=True)
class RawImage:
    """A UDIF image read with struct: its trailer fields and its SuperBlob's blobs by slot."""

    data: bytes = field(repr=False)
    signature_offset: int
    signature_length: int
    blobs: dict[int, bytes] = field(repr=False)

    @property
    def trailer(self) -> bytes:
        return self.data[-512:]

    @property
    def code_directory(self) -> bytes:
        return self.blobs[0]

    @property
    def cms(self) -> bytes:
        wrapper = self.blobs[0x10000]
        return wrapper[8 : struct.unpack_from(">I", wrapper, 4)[0]]


def raw_image(path: Path) -> RawImage:
    data = path.read_bytes()
    assert data[-512:-508] == b"koly"
    offset, length = struct.unpack_from(">QQ", data, len(data) - 512 + 296)
    blobs = {}
    if length:
        magic, _, count = struct.unpack_from(">III", data, offset)
        assert magic == 0xFADE0CC0
        for index in range(count):
            slot, blob_offset = struct.unpack_from(">II", data, offset + 12 + 8 * index)
            start = offset + blob_offset
            blobs[slot] = data[start : start + struct.unpack_from(">I", data, start + 4)[0]]
    return RawImage(data, offset, length, blobs)


def code_limit(data: bytes) -> int:
    """The bytes a signature covers: up to the existing signature, else up to the trailer."""
    offset, length = struct.unpack_from(">QQ", data, len(data) - 512 + 296)
    return offset if length else len(data) - 512


def independent_check(path: Path) -> RawImage:
    """The signature's hashes recomputed with hashlib: the code hash over every byte before the
    signature, slot 6 over the trailer with the length zeroed, slot 2 over the requirements blob."""
    image = raw_image(path)
    fields = cd_fields(image.code_directory)
    assert (fields["hash_type"], fields["page_size"], fields["code_limit"]) == (2, 1, image.signature_offset)
    assert fields["hashes"] == [hashlib.sha256(image.data[: image.signature_offset]).digest()]
    trailer = bytearray(image.trailer)
    trailer[304:312] = bytes(8)
    special = fields["special"]
    assert isinstance(special, dict)
    assert special[6] == hashlib.sha256(bytes(trailer)).digest()
    assert special[2] == hashlib.sha256(image.blobs[2]).digest()
    assert image.signature_offset + image.signature_length == len(image.data) - 512
    return image
