"""Stapling: attach a notarization ticket to what it covers, and check it offline.

Each format is a :class:`Stapleable`, found by the openers in :data:`FORMATS` (the first that
recognizes the path wins; a new format appends its opener):

- a bundle (``.app``, a framework...): the ticket is the file ``Contents/CodeResources``, looked
  up by the main executable's CodeDirectory hash;
- a flat package: the ticket follows the xar archive between two ``t8lr`` markers, looked up by
  the TOC checksum;
- a disk image: the ticket is slot 0x10002 of the image's code signature, looked up by its
  CodeDirectory hash.

:func:`staple` computes the lookup record, fetches the ticket (or takes one given as bytes, the
same path from there on), checks that it parses and covers the file, and writes it with a
temporary file renamed into place. :func:`validate` checks a stapled ticket offline.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509

from ...atomic import write_atomically
from ...crypto.signatures import CertificateSignatureError, verify_certificate_signature
from ..bundle.layout import Bundle, BundleError
from ..codesig.blobs import (
    CodeSignatureFormatError,
    Magic,
    Slot,
    decode_superblob,
    encode_blob,
    encode_superblob,
)
from ..codesig.code_files import staged_code
from ..codesig.embedded_signature import read_signature
from ..codesig.signed_code import preferred_directory, preferred_slice
from ..dmg.detect import looks_like_disk_image
from ..dmg.udif import DiskImage, DiskImageError, DiskImageSignature, read_layout
from ..dmg.udif import read_signature as read_disk_image_signature
from ..macho.parse import MachOError, parse_file
from ..pkg.xar.archive import TICKET_MAGIC as T8LR_MAGIC
from ..pkg.xar.archive import XarArchive
from ..pkg.xar.errors import XarError
from ..pkg.xar.output import copy_range, package_output
from .errors import StapleError
from .lookup import HASH_SHA1, HASH_SHA256, fetch_ticket, record_name
from .stapled import remove_stapled_ticket, stapled_ticket_path
from .ticket import Ticket, TicketError, parse_ticket

_T8LR = struct.Struct("<4sHHII")  # magic, version, kind, length, unused
_T8LR_START, _T8LR_TICKET = 1, 2


class Stapleable(Protocol):
    path: Path
    kind: str

    def digests(self) -> list[tuple[int, bytes]]:
        """(hash type, digest) the ticket must cover; the first is the one looked up."""
        ...

    def read_ticket(self) -> bytes | None: ...

    def write_ticket(self, ticket: bytes) -> None: ...

    def remove_ticket(self) -> bool: ...


@dataclass
class BundleTarget:
    path: Path
    bundle: Bundle
    kind: str = "app"

    @property
    def ticket_path(self) -> Path:
        return stapled_ticket_path(self.bundle.content_root)

    def digests(self) -> list[tuple[int, bytes]]:
        executable = self.bundle.executable_path
        try:
            parsed = parse_file(executable.read_bytes())
            chosen = preferred_slice(parsed)
            found = []
            for macho in [chosen, *(m for m in parsed.slices if m is not chosen)]:
                signature = read_signature(macho)
                if signature is None:
                    raise StapleError(f"{self.path.name}: the main executable is not signed; sign it before stapling")
                directory = preferred_directory(signature.code_directories)
                found.append((int(directory.hash_type), directory.cdhash()))
            return found
        except (OSError, MachOError, CodeSignatureFormatError) as exc:
            raise StapleError(f"{self.path.name}: cannot read the main executable's signature: {exc}") from None

    def read_ticket(self) -> bytes | None:
        try:  # whatever is there: a damaged ticket is reported as damaged, not as missing
            return self.ticket_path.read_bytes()
        except FileNotFoundError:
            return None

    def write_ticket(self, ticket: bytes) -> None:
        write_atomically(self.ticket_path, ticket, fsync=True, make_parents=True)

    def remove_ticket(self) -> bool:
        return remove_stapled_ticket(self.bundle.content_root)


@dataclass
class PackageTarget:
    path: Path
    archive: XarArchive
    kind: str = "package"

    def digests(self) -> list[tuple[int, bytes]]:
        algorithm = self.archive.header.checksum_name
        hash_type = {"sha1": HASH_SHA1, "sha256": HASH_SHA256}.get(algorithm)
        if hash_type is None:
            raise StapleError(f"{self.path.name}: a package with a {algorithm} TOC checksum cannot be notarized")
        if not self.archive.toc.signatures:
            raise StapleError(f"{self.path.name} is not signed; sign it with productsign before stapling")
        return [(hash_type, hashlib.new(algorithm, self.archive.toc_compressed).digest())]

    @property
    def _xar_end(self) -> int:
        stapled = self.archive.stapled_ticket
        return stapled.offset if stapled else self.archive.identity.size

    def read_ticket(self) -> bytes | None:
        return self.archive.read_ticket()

    def _rewrite(self, ticket: bytes | None) -> None:
        mode = self.path.stat().st_mode & 0o7777
        with self.path.open("rb") as source, package_output(self.path, mode) as out:
            copy_range(source, out, 0, self._xar_end, str(self.path))
            if ticket is not None:
                out.write(_T8LR.pack(T8LR_MAGIC, 1, _T8LR_START, 0, 0))
                out.write(ticket)
                out.write(_T8LR.pack(T8LR_MAGIC, 1, _T8LR_TICKET, len(ticket), 0))
        self.archive = XarArchive.open(self.path)

    def write_ticket(self, ticket: bytes) -> None:
        self._rewrite(ticket)

    def remove_ticket(self) -> bool:
        if self.archive.stapled_ticket is None:
            return False
        self._rewrite(None)
        return True


def _open_bundle(path: Path) -> Stapleable | None:
    if not path.is_dir():
        return None
    try:
        bundle = Bundle.open(path)
    except BundleError as exc:
        raise StapleError(f"{path.name}: {exc}") from None
    if bundle.content_root.name != "Contents":
        raise StapleError(f"{path.name}: only bundles with a Contents folder can carry a ticket")
    return BundleTarget(path, bundle)


def _open_package(path: Path) -> Stapleable | None:
    try:
        with path.open("rb") as stream:
            if stream.read(4) != b"xar!":
                return None
    except OSError:
        return None
    try:
        return PackageTarget(path, XarArchive.open(path))
    except XarError as exc:
        raise StapleError(str(exc)) from None


@dataclass
class DiskImageTarget:
    """A UDIF image: the ticket is a BlobWrapper in slot 0x10002 of the image's SuperBlob, which is
    re-laid (the other blobs unchanged, in their order) with the trailer's signature length."""

    path: Path
    kind: str = "disk image"

    def _read(self) -> tuple[DiskImage, DiskImageSignature | None]:
        try:
            descriptor = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise StapleError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            image = read_layout(self.path, descriptor)
            return image, read_disk_image_signature(image, descriptor)
        except (DiskImageError, CodeSignatureFormatError) as exc:
            raise StapleError(f"{self.path.name}: {exc}") from None
        finally:
            os.close(descriptor)

    def digests(self) -> list[tuple[int, bytes]]:
        _image, read = self._read()
        if read is None or read.signature is None:
            raise StapleError(
                f"{self.path.name} is not signed; sign the disk image (codesign -s ...) before stapling"
            )
        directory = preferred_directory(read.signature.code_directories)
        return [(int(directory.hash_type), directory.cdhash())]

    def read_ticket(self) -> bytes | None:
        _image, read = self._read()
        return read.ticket if read is not None else None

    def _rewrite(self, ticket: bytes | None) -> None:
        image, read = self._read()
        if read is None:
            raise StapleError(f"{self.path.name} is not signed; sign the disk image before stapling")
        superblob = decode_superblob(read.raw, Magic.EMBEDDED_SIGNATURE)
        entries = [(slot, data) for slot in superblob.slots() if slot != Slot.TICKET and (data := superblob.get(slot))]
        if ticket is not None:
            entries.append((int(Slot.TICKET), encode_blob(Magic.BLOB_WRAPPER, ticket)))
        relaid = encode_superblob(Magic.EMBEDDED_SIGNATURE, entries)
        start = image.trailer.signature_offset
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            with staged_code(self.path) as staged:
                staged.copy(descriptor, 0, start, 0)
                staged.write(relaid, start)
                staged.write(image.trailer.with_signature(start, len(relaid)), start + len(relaid))
                staged.commit(start + len(relaid) + len(image.trailer.raw))
        finally:
            os.close(descriptor)

    def write_ticket(self, ticket: bytes) -> None:
        self._rewrite(ticket)

    def remove_ticket(self) -> bool:
        if self.read_ticket() is None:
            return False
        self._rewrite(None)
        return True


def _open_disk_image(path: Path) -> Stapleable | None:
    return DiskImageTarget(path) if looks_like_disk_image(path) else None


FORMATS: list[Callable[[Path], Stapleable | None]] = [_open_bundle, _open_package, _open_disk_image]


def open_stapleable(path: str | os.PathLike[str]) -> Stapleable:
    target = Path(path)
    if not target.exists():
        raise StapleError(f"{target}: no such file or directory")
    for opener in FORMATS:
        found = opener(target)
        if found is not None:
            return found
    raise StapleError(
        f"{target.name}: stapling is supported for apps and other bundles, disk images and flat packages"
    )


def lookup_record(target: Stapleable) -> str:
    hash_type, digest = target.digests()[0]
    return record_name(hash_type, digest)


def covers(ticket: Ticket, hash_type: int, digest: bytes) -> bool:
    """Whether the ticket lists this digest with this hash type (digests are cut to the ticket's size)."""
    return any(entry.hash_type == hash_type and entry.digest == digest[: len(entry.digest)] for entry in ticket.entries)


def check_chain(ticket: Ticket, anchors: tuple[x509.Certificate, ...] = ()) -> bool:
    """Check that each certificate the ticket carries is issued by the next one; True when the last
    is issued by one of ``anchors`` (Apple Root CA - G3, which a ticket does not carry)."""
    chain = ticket.certificates
    for child, parent in zip(chain, chain[1:], strict=False):
        _check_issued_by(ticket, child, parent)
    for anchor in anchors:
        if anchor.subject == chain[-1].issuer:
            _check_issued_by(ticket, chain[-1], anchor)
            return True
    return False


def _check_issued_by(ticket: Ticket, child: x509.Certificate, parent: x509.Certificate) -> None:
    try:
        verify_certificate_signature(child, parent)
    except CertificateSignatureError:
        raise TicketError(
            f"{ticket.name}: the ticket's certificate {child.subject.rfc4514_string()} is not issued by "
            f"{parent.subject.rfc4514_string()}"
        ) from None


def check_ticket(target: Stapleable, data: bytes, anchors: tuple[x509.Certificate, ...] = ()) -> Ticket:
    """Parse ``data`` and check its signature, its chain and that it covers ``target``."""
    ticket = parse_ticket(data, target.path.name)
    ticket.verify_signature()
    if not check_chain(ticket, anchors) and anchors:
        raise TicketError(
            f"{ticket.name}: the ticket's chain ends at {ticket.certificates[-1].issuer.rfc4514_string()}, "
            "which is none of the configured ticket anchors"
        )
    digests = target.digests()
    if not any(covers(ticket, hash_type, digest) for hash_type, digest in digests):
        wanted = ", ".join(record_name(t, d) for t, d in digests)
        raise TicketError(f"the ticket does not cover {target.path.name} (it has no entry for {wanted})")
    return ticket


def staple(
    path: str | os.PathLike[str],
    *,
    ticket: bytes | None = None,
    wait: float = 0.0,
    interval: float = 15.0,
    anchors: tuple[x509.Certificate, ...] = (),
) -> Ticket:
    """Fetch (unless ``ticket`` is given) and staple the ticket; nothing is written if it does not check."""
    target = open_stapleable(path)
    data = ticket if ticket is not None else fetch_ticket(lookup_record(target), wait=wait, interval=interval)
    parsed = check_ticket(target, data, anchors)
    target.write_ticket(data)
    return parsed


def validate(path: str | os.PathLike[str], anchors: tuple[x509.Certificate, ...] = ()) -> Ticket:
    target = open_stapleable(path)
    data = target.read_ticket()
    if data is None:
        raise StapleError(f"{target.path.name} does not have a ticket stapled to it.")
    return check_ticket(target, data, anchors)


def unstaple(path: str | os.PathLike[str]) -> bytes | None:
    """Remove the stapled ticket and return it (None when there was none)."""
    target = open_stapleable(path)
    data = target.read_ticket()
    if data is not None:
        target.remove_ticket()
    return data
