"""The CodeDirectory: page hashes of the code, hashes of the special slots, identity and flags.

Layout (big-endian, offsets from the CodeDirectory start) grows with the version; fields past the
version's fixed header are absent. Apple's builder writes: fixed header, identifier NUL, team id
NUL, special-slot hashes (highest slot first), code-slot hashes. ``hashOffset`` points at code
slot 0; special slot ``k`` lives at ``hashOffset - k * hashSize``.

Page hashing is exposed as :func:`hash_pages` over a range of pages so callers can spread it over a
thread pool; hashlib releases the GIL for each 4 KiB page.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .blobs import CodeSignatureFormatError, Magic, Slot

if TYPE_CHECKING:
    from concurrent.futures import Executor

PAGE_SIZE = 4096
CDHASH_SIZE = 20
CHUNK_PAGES = 1024  # pages per thread-pool task: 4 MiB of code

VERSION_EARLIEST = 0x20001
VERSION_SCATTER = 0x20100
VERSION_TEAM_ID = 0x20200
VERSION_CODE_LIMIT_64 = 0x20300
VERSION_EXEC_SEGMENT = 0x20400
VERSION_RUNTIME = 0x20500
VERSION_LINKAGE = 0x20600
VERSION_LATEST_ACCEPTED = 0x2F000

# Size of the fixed header of each version (the offset where variable data may start).
_HEADER_SIZES = (
    (VERSION_LINKAGE, 108),
    (VERSION_RUNTIME, 96),
    (VERSION_EXEC_SEGMENT, 88),
    (VERSION_CODE_LIMIT_64, 64),
    (VERSION_TEAM_ID, 52),
    (VERSION_SCATTER, 48),
    (VERSION_EARLIEST, 44),
)
_U32_MAX = 0xFFFFFFFF


class HashType(enum.IntEnum):
    SHA1 = 1
    SHA256 = 2
    SHA256_TRUNCATED = 3
    SHA384 = 4
    SHA512 = 5

    @property
    def hashlib_name(self) -> str:
        return _HASHLIB_NAMES[self]

    @property
    def size(self) -> int:
        """``hashSize``: bytes stored per slot (SHA-256 truncated keeps 20)."""
        return _SIZES[self]

    def digest(self, data: bytes | memoryview) -> bytes:
        return hashlib.new(self.hashlib_name, data).digest()[: self.size]

    @classmethod
    def from_name(cls, name: str) -> HashType:
        """Accepts ``sha256``, ``SHA-256``, ``sha1`` and the like (codesign's ``--digest-algorithm``)."""
        key = name.replace("-", "").replace("_", "").lower()
        for hash_type in (cls.SHA1, cls.SHA256, cls.SHA384, cls.SHA512):
            if hash_type.hashlib_name == key:
                return hash_type
        raise CodeSignatureFormatError(
            f"unknown digest algorithm {name!r}; use sha1, sha256, sha384 or sha512"
        )


_HASHLIB_NAMES = {
    HashType.SHA1: "sha1",
    HashType.SHA256: "sha256",
    HashType.SHA256_TRUNCATED: "sha256",
    HashType.SHA384: "sha384",
    HashType.SHA512: "sha512",
}
_SIZES = {
    HashType.SHA1: 20,
    HashType.SHA256: 32,
    HashType.SHA256_TRUNCATED: 20,
    HashType.SHA384: 48,
    HashType.SHA512: 64,
}


class CodeDirectoryFlags(enum.IntFlag):
    HOST = 0x1
    ADHOC = 0x2
    FORCE_HARD = 0x100
    FORCE_KILL = 0x200
    FORCE_EXPIRATION = 0x400
    RESTRICT = 0x800
    ENFORCEMENT = 0x1000
    LIBRARY_VALIDATION = 0x2000
    RUNTIME = 0x10000
    LINKER_SIGNED = 0x20000


class ExecSegmentFlags(enum.IntFlag):
    MAIN_BINARY = 0x1
    ALLOW_UNSIGNED = 0x10
    DEBUGGER = 0x20
    JIT = 0x40
    SKIP_LIBRARY_VALIDATION = 0x80
    CAN_LOAD_CDHASH = 0x100
    CAN_EXEC_CDHASH = 0x200


def header_size(version: int) -> int:
    for minimum, size in _HEADER_SIZES:
        if version >= minimum:
            return size
    raise CodeSignatureFormatError(f"CodeDirectory version {version:#x} is older than any Apple defines")


def page_count(code_limit: int, page_size: int = PAGE_SIZE) -> int:
    if page_size == 0:
        return 1 if code_limit else 0
    return -(-code_limit // page_size)


def hash_pages(
    code: bytes | memoryview, first: int, stop: int, hash_type: HashType, page_size: int = PAGE_SIZE
) -> list[bytes]:
    """Hashes of pages ``first`` up to (not including) ``stop`` of ``code``; the last page may be short."""
    view = memoryview(code)
    new = getattr(hashlib, hash_type.hashlib_name)
    size = hash_type.size
    end = len(view)
    return [
        new(view[start : min(start + page_size, end)]).digest()[:size]
        for start in range(first * page_size, min(stop * page_size, end), page_size)
    ]


def hash_code(
    code: bytes | memoryview,
    hash_type: HashType,
    page_size: int = PAGE_SIZE,
    executor: Executor | None = None,
) -> list[bytes]:
    """Page hashes of all of ``code`` (the slice up to its code limit), in a thread pool if given one."""
    if page_size == 0:
        return [hash_type.digest(code)] if len(code) else []
    pages = page_count(len(code), page_size)
    if executor is None or pages <= CHUNK_PAGES:
        return hash_pages(code, 0, pages, hash_type, page_size)
    futures = [
        executor.submit(hash_pages, code, first, min(first + CHUNK_PAGES, pages), hash_type, page_size)
        for first in range(0, pages, CHUNK_PAGES)
    ]
    hashes: list[bytes] = []
    for future in futures:
        hashes.extend(future.result())
    return hashes


def choose_version(*, runtime: int, exec_segment_limit: int, code_limit: int, team_id: str | None) -> int:
    """The version Apple's builder picks: the oldest one that holds every field in use."""
    if runtime:
        return VERSION_RUNTIME
    if exec_segment_limit:
        return VERSION_EXEC_SEGMENT
    if code_limit > _U32_MAX:
        return VERSION_CODE_LIMIT_64
    if team_id:
        return VERSION_TEAM_ID
    return VERSION_SCATTER


@dataclass(frozen=True)
class CodeDirectory:
    """A CodeDirectory's content. ``special_slots`` maps slot number to hash (absent = zero-filled).

    Built ones encode to Apple's layout; parsed ones keep their original bytes in ``source`` (which
    is what the cdhash covers). Equality compares content only, so a parsed CodeDirectory can be
    compared field by field with one built from the same inputs.
    """

    identifier: str
    hash_type: HashType
    code_limit: int
    code_hashes: tuple[bytes, ...]
    special_slots: Mapping[int, bytes] = field(default_factory=dict)
    version: int = VERSION_SCATTER
    flags: int = 0
    team_id: str | None = None
    page_size: int = PAGE_SIZE
    platform: int = 0
    exec_segment_base: int = 0
    exec_segment_limit: int = 0
    exec_segment_flags: int = 0
    runtime: int = 0
    source: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def special_slot_count(self) -> int:
        return max(self.special_slots, default=0)

    @property
    def blob(self) -> bytes:
        """The CodeDirectory blob as stored in the signature."""
        return self.source if self.source is not None else self.encode()

    def cdhash(self) -> bytes:
        """The 20-byte cdhash: the CodeDirectory's own hash of its blob, truncated."""
        return self.full_hash()[:CDHASH_SIZE]

    def full_hash(self) -> bytes:
        """The untruncated hash of the blob (CMS hash-agility V2 attribute carries this)."""
        return hashlib.new(self.hash_type.hashlib_name, self.blob).digest()

    def encode(self) -> bytes:
        version = self.version
        fixed = header_size(version)
        if self.team_id and version < VERSION_TEAM_ID:
            raise CodeSignatureFormatError(f"CodeDirectory version {version:#x} cannot carry a team ID")
        if self.runtime and version < VERSION_RUNTIME:
            raise CodeSignatureFormatError(
                f"CodeDirectory version {version:#x} cannot carry a runtime version"
            )
        if self.exec_segment_limit and version < VERSION_EXEC_SEGMENT:
            raise CodeSignatureFormatError(f"CodeDirectory version {version:#x} cannot carry an exec segment")
        if self.code_limit > _U32_MAX and version < VERSION_CODE_LIMIT_64:
            raise CodeSignatureFormatError(
                f"CodeDirectory version {version:#x} cannot describe code over 4 GiB"
            )
        size = self.hash_type.size
        for slot, digest in self.special_slots.items():
            if slot < 1 or len(digest) != size:
                raise CodeSignatureFormatError(f"special slot {slot} needs a {size}-byte hash")
        if any(len(digest) != size for digest in self.code_hashes):
            raise CodeSignatureFormatError(
                f"every code slot of a {self.hash_type.name} CodeDirectory is {size} bytes"
            )

        identifier = self.identifier.encode() + b"\0"
        team = self.team_id.encode() + b"\0" if self.team_id else b""
        ident_offset = fixed
        team_offset = ident_offset + len(identifier) if team else 0
        special_count = self.special_slot_count
        hash_offset = ident_offset + len(identifier) + len(team) + special_count * size
        length = hash_offset + len(self.code_hashes) * size

        code_limit32 = min(self.code_limit, _U32_MAX)
        code_limit64 = self.code_limit if self.code_limit > _U32_MAX else 0
        page_shift = self.page_size.bit_length() - 1 if self.page_size else 0
        header = struct.pack(
            ">IIIIIIIIIBBBBI",
            Magic.CODE_DIRECTORY,
            length,
            version,
            self.flags,
            hash_offset,
            ident_offset,
            special_count,
            len(self.code_hashes),
            code_limit32,
            size,
            self.hash_type,
            self.platform,
            page_shift,
            0,  # spare2
        )
        header += struct.pack(">I", 0)  # scatterOffset
        header += struct.pack(">II", team_offset, 0)  # teamOffset, spare3
        header += struct.pack(">Q", code_limit64)
        header += struct.pack(
            ">QQQ", self.exec_segment_base, self.exec_segment_limit, self.exec_segment_flags
        )
        header += struct.pack(">II", self.runtime, 0)  # runtime, preEncryptOffset
        header += bytes(12)  # linkage hash type/app type/subtype, linkageOffset, linkageSize
        special = b"".join(
            self.special_slots.get(slot, bytes(size)) for slot in range(special_count, 0, -1)
        )
        blob = header[:fixed] + identifier + team + special + b"".join(self.code_hashes)
        assert len(blob) == length
        return blob

    @classmethod
    def parse(cls, data: bytes | memoryview) -> CodeDirectory:
        """Parse a CodeDirectory blob that starts at the beginning of ``data``."""
        if len(data) < 44:
            raise CodeSignatureFormatError(
                f"a CodeDirectory needs at least 44 bytes, {len(data)} are available"
            )
        magic, length, version, flags, hash_offset, ident_offset, special_count, code_count, code_limit = (
            struct.unpack_from(">9I", data)
        )
        if magic != Magic.CODE_DIRECTORY:
            raise CodeSignatureFormatError(f"not a CodeDirectory: magic 0x{magic:08x}")
        if length > len(data):
            raise CodeSignatureFormatError(
                f"the CodeDirectory claims {length} bytes, {len(data)} are available"
            )
        if not VERSION_EARLIEST <= version < VERSION_LATEST_ACCEPTED:
            raise CodeSignatureFormatError(f"unsupported CodeDirectory version {version:#x}")
        blob = bytes(data[:length])
        fixed = header_size(version)
        if fixed > length:
            raise CodeSignatureFormatError(
                f"a version {version:#x} CodeDirectory needs {fixed} header bytes, it has {length}"
            )
        hash_size, raw_hash_type, platform, page_shift = struct.unpack_from(">BBBB", blob, 36)
        try:
            hash_type = HashType(raw_hash_type)
        except ValueError:
            raise CodeSignatureFormatError(
                f"the CodeDirectory uses unknown hash type {raw_hash_type}"
            ) from None
        if hash_size != hash_type.size:
            raise CodeSignatureFormatError(
                f"the CodeDirectory's hash size is {hash_size} but {hash_type.name} hashes are "
                f"{hash_type.size} bytes"
            )

        def field_at(code: str, offset: int, minimum_version: int) -> int:
            return struct.unpack_from(code, blob, offset)[0] if version >= minimum_version else 0

        team_offset = field_at(">I", 48, VERSION_TEAM_ID)
        code_limit64 = field_at(">Q", 56, VERSION_CODE_LIMIT_64)
        exec_base = field_at(">Q", 64, VERSION_EXEC_SEGMENT)
        exec_limit = field_at(">Q", 72, VERSION_EXEC_SEGMENT)
        exec_flags = field_at(">Q", 80, VERSION_EXEC_SEGMENT)
        runtime = field_at(">I", 88, VERSION_RUNTIME)

        first_special = hash_offset - special_count * hash_size
        if first_special < fixed or hash_offset + code_count * hash_size > length:
            raise CodeSignatureFormatError(
                f"the CodeDirectory's {special_count} special and {code_count} code slots do not fit in "
                f"its {length} bytes"
            )
        special_slots = {}
        for slot in range(1, special_count + 1):
            digest = blob[hash_offset - slot * hash_size : hash_offset - (slot - 1) * hash_size]
            if any(digest):
                special_slots[slot] = digest
        code_hashes = tuple(
            blob[hash_offset + index * hash_size : hash_offset + (index + 1) * hash_size]
            for index in range(code_count)
        )
        return cls(
            identifier=_c_string(blob, ident_offset, fixed, "identifier"),
            hash_type=hash_type,
            code_limit=code_limit64 or code_limit,
            code_hashes=code_hashes,
            special_slots=special_slots,
            version=version,
            flags=flags,
            team_id=_c_string(blob, team_offset, fixed, "team ID") if team_offset else None,
            page_size=1 << page_shift if page_shift else 0,
            platform=platform,
            exec_segment_base=exec_base,
            exec_segment_limit=exec_limit,
            exec_segment_flags=exec_flags,
            runtime=runtime,
            source=blob,
        )


def _c_string(blob: bytes, offset: int, fixed: int, what: str) -> str:
    end = blob.find(b"\0", offset)
    if offset < fixed or end < 0:
        raise CodeSignatureFormatError(
            f"the CodeDirectory's {what} at offset {offset} is not a NUL-terminated string"
        )
    try:
        return blob[offset:end].decode()
    except UnicodeDecodeError:
        raise CodeSignatureFormatError(f"the CodeDirectory's {what} is not UTF-8") from None


@dataclass(frozen=True)
class ExecSegment:
    """The executable segment the kernel treats as code: ``__TEXT``'s file range, and its flags."""

    base: int
    limit: int
    flags: int = 0


def build_code_directory(
    code: bytes | memoryview | None,
    *,
    identifier: str,
    hash_type: HashType = HashType.SHA256,
    flags: int = 0,
    team_id: str | None = None,
    special_slot_data: Mapping[int, bytes] | None = None,
    exec_segment: ExecSegment | None = None,
    runtime: int = 0,
    platform: int = 0,
    page_size: int = PAGE_SIZE,
    executor: Executor | None = None,
    code_hashes: Sequence[bytes] | None = None,
    code_limit: int | None = None,
) -> CodeDirectory:
    """Build the CodeDirectory of ``code``: the slice's bytes up to its code limit (the signature offset).

    ``special_slot_data`` maps slot number to the *content* to hash with this CodeDirectory's hash
    type (Info.plist bytes, the requirements blob, CodeResources, entitlement blobs), so that one
    mapping serves CodeDirectories of different hash types. ``code_hashes`` skips page hashing when
    the caller already has them; ``code`` may then be None, with ``code_limit`` giving its length.
    """
    if page_size and page_size & (page_size - 1):
        raise CodeSignatureFormatError(f"page size {page_size} is not a power of two")
    if code is None and (code_hashes is None or code_limit is None):
        raise ValueError("without the code, build_code_directory needs its page hashes and length")
    if code_hashes is None:
        assert code is not None
        code_hashes = hash_code(code, hash_type, page_size, executor)
    special_slots = {}
    for slot, content in (special_slot_data or {}).items():
        if not Slot.INFO_PLIST <= slot < Slot.ALTERNATE_CODE_DIRECTORY:
            raise CodeSignatureFormatError(f"slot {slot} is not a special slot")
        special_slots[int(slot)] = hash_type.digest(content)
    exec_segment = exec_segment or ExecSegment(0, 0, 0)
    if code is not None:
        code_limit = len(code)
    assert code_limit is not None
    version = choose_version(
        runtime=runtime, exec_segment_limit=exec_segment.limit, code_limit=code_limit, team_id=team_id
    )
    return CodeDirectory(
        identifier=identifier,
        hash_type=hash_type,
        code_limit=code_limit,
        code_hashes=tuple(code_hashes),
        special_slots=special_slots,
        version=version,
        flags=flags,
        team_id=team_id or None,
        page_size=page_size,
        platform=platform,
        exec_segment_base=exec_segment.base,
        exec_segment_limit=exec_segment.limit,
        exec_segment_flags=exec_segment.flags,
        runtime=runtime,
    )


def code_directory_size(
    *, identifier: str, team_id: str | None, hash_type: HashType, special_slot_count: int, code_limit: int,
    version: int, page_size: int = PAGE_SIZE,
) -> int:
    """The encoded size of a CodeDirectory, known before hashing (to reserve signature space)."""
    size = hash_type.size
    team = len(team_id.encode()) + 1 if team_id else 0
    slots = special_slot_count + page_count(code_limit, page_size)
    return header_size(version) + len(identifier.encode()) + 1 + team + slots * size


def default_hash_types(platform: int, minimum_os: int) -> tuple[HashType, ...]:
    """codesign's default digests: SHA-1 and SHA-256 for targets too old to check SHA-256 alone.

    macOS before 10.11.4 and iOS/tvOS before 11 get both (SHA-1 primary); everything else SHA-256.
    """
    if platform == 1 and minimum_os < 0x000A0B04:
        return (HashType.SHA1, HashType.SHA256)
    if platform in (2, 3) and minimum_os < 0x000B0000:
        return (HashType.SHA1, HashType.SHA256)
    return (HashType.SHA256,)
