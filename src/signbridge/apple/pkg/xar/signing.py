"""Signature surgery on a flat package: make room for signatures, then write the signed copy.

A signed package's heap starts with the signature area, then the files' data, in the order
Apple's libxar writes it (``xar_close``: checksum, then each signature in the order added;
``productsign`` adds the RSA signature first) and as observed in Apple-signed packages
(checksum at 0, RSA at 20 with a SHA-1 TOC, CMS right after)::

    heap 0              TOC checksum         hash of the compressed TOC (20/32/64 bytes)
    heap H              <signature style="RSA">    rsa_size bytes (the key's modulus length)
    heap H+rsa_size     <x-signature style="CMS">  cms_reserved_size bytes, CMS zero-padded
    heap H+rsa+cms      file data, byte-identical to the input, every <offset> moved by the growth

Both signatures sign the TOC checksum; that checksum is known only once the new TOC (which holds
the signatures' offsets, sizes and certificates) is final, hence two steps:

1. :func:`prepare_signed` builds the new TOC and exposes ``toc_checksum`` for the signer;
2. :func:`write_signed` copies the input's file data to a temporary file beside the output,
   checking every file's archived checksum as it passes (one read of each byte), then has the
   signatures made, writes header, TOC, checksum and signatures before the data and renames the
   file over the output.

Re-signing drops the old signatures (and an old signature area of another size) and any stapled
notarization ticket, which no longer matches once the TOC changes; ``PreparedPackage`` says so.
The input file is never written to.
"""

from __future__ import annotations

import base64
import copy
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ....crypto.der import CertificateFormatError, read_certificate
from ....crypto.hashes import HashAlgorithm
from ....errors import SignatureError
from .archive import XarArchive
from .errors import HeapRangeError, InvalidNumberError, SignatureSizeError, UnsupportedChecksumError, XarError
from .filedata import stored_checksums
from .header import MAX_INT, pack_header
from .output import copy_checked, copy_range, package_output
from .toc import SIGNATURE, X_SIGNATURE
from .tocxml import XMLDSIG_NS, Element, child, children, indent, local_name, make, serialize

SIGNATURE_TIME = "signature-creation-time"
_APPLE_EPOCH = datetime(2001, 1, 1, tzinfo=UTC).timestamp()
SIGNING_CHECKSUMS = (HashAlgorithm.SHA1, HashAlgorithm.SHA256, HashAlgorithm.SHA512)
MAX_RSA_SIZE = 1024  # an 8192-bit modulus
MAX_CMS_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class PreparedPackage:
    """A package's new TOC, ready to be signed: sign ``toc_checksum`` in :func:`write_signed`."""

    source: XarArchive
    checksum_algorithm: HashAlgorithm
    toc_checksum: bytes  # what the RSA signature and the CMS sign
    toc_xml: bytes = field(repr=False)
    toc_compressed: bytes = field(repr=False)
    rsa_size: int | None
    cms_reserved_size: int | None
    certificates: tuple[bytes, ...] = field(repr=False)
    copy_offset: int  # the input's file data: file offset and length to copy after the signatures
    copy_length: int
    replaced_signatures: tuple[str, ...]  # styles of the signatures the input had ("RSA", "CMS")
    dropped_ticket: bool  # the input had a stapled notarization ticket, which is not carried over

    @property
    def rsa_offset(self) -> int:
        return self.checksum_algorithm.digest_size

    @property
    def cms_offset(self) -> int:
        return self.rsa_offset + (self.rsa_size or 0)

    @property
    def signature_area_size(self) -> int:
        return self.cms_offset + (self.cms_reserved_size or 0)


def prepare_signed(
    archive: XarArchive | str | os.PathLike[str],
    checksum_alg: HashAlgorithm | str,
    rsa_size: int | None,
    cms_reserved_size: int | None,
    certificates: list[bytes],
    *,
    signed_at: datetime | None = None,
) -> PreparedPackage:
    """Build the TOC of the signed package.

    ``rsa_size`` is the RSA signature's length (the modulus length, 256 for RSA-2048) and
    ``cms_reserved_size`` the room kept for the CMS; either may be None to leave that signature out.
    ``certificates`` (DER, leaf first) go into both signatures' ``KeyInfo``. ``signed_at`` (default
    now) updates a ``<signature-creation-time>`` the input has.
    """
    if not isinstance(archive, XarArchive):
        archive = XarArchive.open(archive)
    archive.verify_toc_checksum()
    algorithm = checksum_alg if isinstance(checksum_alg, HashAlgorithm) else HashAlgorithm.from_name(checksum_alg)
    if algorithm not in SIGNING_CHECKSUMS:
        names = ", ".join(a.hashlib_name for a in SIGNING_CHECKSUMS)
        raise UnsupportedChecksumError(f"packages are signed with a {names} TOC checksum, not {algorithm.hashlib_name}")
    _check_size("RSA signature", rsa_size, MAX_RSA_SIZE)
    _check_size("CMS signature", cms_reserved_size, MAX_CMS_SIZE)
    if rsa_size is None and cms_reserved_size is None:
        raise SignatureSizeError("a signed package needs an RSA signature, a CMS signature, or both")
    certificates = [bytes(cert) for cert in certificates]
    _check_certificates(certificates)

    old_end = _signature_area_end(archive)
    new_end = algorithm.digest_size + (rsa_size or 0) + (cms_reserved_size or 0)

    root = copy.deepcopy(archive.toc.root)
    toc = child(root, "toc")
    old_signatures = [e for e in toc if local_name(e.tag) in (SIGNATURE, X_SIGNATURE)]
    old_position = list(toc).index(old_signatures[0]) if old_signatures else None
    for element in old_signatures:
        toc.remove(element)
    added_checksum = _set_checksum(toc, algorithm)
    _refresh_signature_time(toc, signed_at or datetime.now(UTC))
    position = _signature_position(toc, old_position, added_checksum)
    for file_element in children(toc, "file"):
        _move_offsets(file_element, old_end, new_end, archive.name)
    _insert_signatures(toc, position, algorithm.digest_size, rsa_size, cms_reserved_size, certificates)

    toc_xml = serialize(root)
    toc_compressed = zlib.compress(toc_xml, 9)
    return PreparedPackage(
        source=archive,
        checksum_algorithm=algorithm,
        toc_checksum=algorithm.digest(toc_compressed),
        toc_xml=toc_xml,
        toc_compressed=toc_compressed,
        rsa_size=rsa_size,
        cms_reserved_size=cms_reserved_size,
        certificates=tuple(certificates),
        copy_offset=archive.heap_offset + old_end,
        copy_length=archive.heap_size - old_end,
        replaced_signatures=tuple(slot.style for slot in archive.toc.signatures),
        dropped_ticket=archive.stapled_ticket is not None,
    )


Signatures = tuple[bytes | None, bytes | None]  # the RSA signature and the CMS, either possibly absent


def write_signed(
    prepared: PreparedPackage,
    out_path: str | os.PathLike[str],
    sign: Callable[[PreparedPackage], Signatures],
    *,
    check_files: bool = True,
) -> Path:
    """Write the signed package to ``out_path``, atomically: nothing is left behind on error.

    The input's file data is copied first, into a temporary file beside ``out_path`` at its final
    place; with ``check_files`` every file's stored bytes are checked against their archived checksum
    in the same pass (:func:`.output.copy_checked`), else the kernel copies them unread. Only then is
    ``sign`` called for the signatures of ``prepared.toc_checksum``, so a package whose data does not
    match its table of contents is refused (:class:`ChecksumMismatchError` naming the file) before
    anything is signed. Header, TOC, checksum and signatures are written before the data last.
    """
    source = prepared.source
    out_path = Path(out_path)
    if out_path.exists() and os.path.samefile(out_path, source.path):
        raise XarError(f"the signed package must be written to a new file, not over its input {source.name}")
    head = pack_header(
        len(prepared.toc_compressed), len(prepared.toc_xml), prepared.checksum_algorithm.hashlib_name
    ) + prepared.toc_compressed
    with source.reopen() as src:
        mode = os.fstat(src.fileno()).st_mode & 0o777
        with package_output(out_path, mode) as out:
            out.seek(len(head) + prepared.signature_area_size)
            if check_files:
                checks = stored_checksums(source.toc.files, source.heap_offset, source.name)
                copy_checked(src, out, prepared.copy_offset, prepared.copy_length, checks, source.name)
            else:
                copy_range(src, out, prepared.copy_offset, prepared.copy_length, source.name)
            rsa_signature, cms = sign(prepared)
            _check_signature_sizes(prepared, rsa_signature, cms)
            out.seek(0)
            out.write(head)
            out.write(prepared.toc_checksum)
            out.write(rsa_signature or b"")
            out.write((cms or b"").ljust(prepared.cms_reserved_size or 0, b"\0"))
    return out_path


def _check_signature_sizes(prepared: PreparedPackage, rsa_signature: bytes | None, cms: bytes | None) -> None:
    rsa_length, cms_length = len(rsa_signature or b""), len(cms or b"")
    if rsa_length != (prepared.rsa_size or 0):
        raise SignatureSizeError(
            f"the RSA signature is {rsa_length} bytes, but {prepared.rsa_size or 0} were reserved for it"
        )
    if cms_length > (prepared.cms_reserved_size or 0):
        raise SignatureSizeError(
            f"the CMS signature is {cms_length} bytes, more than the {prepared.cms_reserved_size or 0} reserved for it"
        )


def _signature_area_end(archive: XarArchive) -> int:
    """Where the input's checksum and signatures end: the heap before that is replaced, the rest copied."""
    toc = archive.toc
    slots = ([toc.checksum.heap_range] if toc.checksum else []) + [slot.heap_range for slot in toc.signatures]
    end = max((heap_range.end for heap_range in slots), default=0)
    for entry in toc.files:
        for heap_range in entry.heap_ranges:
            if heap_range.length and heap_range.offset < end:
                raise HeapRangeError(
                    f"{archive.name}: the data of {entry.path!r} lies inside the signature area (heap bytes "
                    f"0..{end}); the package is damaged and cannot be re-signed"
                )
    return end


def _check_size(what: str, size: int | None, limit: int) -> None:
    if size is not None and not 0 < size <= limit:
        raise SignatureSizeError(f"the {what} size must be from 1 to {limit} bytes, not {size}")


def _check_certificates(certificates: list[bytes]) -> None:
    if not certificates:
        raise SignatureError("a package signature needs the signing certificate")
    for number, der in enumerate(certificates, 1):
        try:
            read_certificate(der, f"certificate {number} of the chain")
        except CertificateFormatError:
            raise SignatureError(f"certificate {number} of the chain is not a DER-encoded X.509 certificate") from None


def _set_checksum(toc: Element, algorithm: HashAlgorithm) -> bool:
    """Point <checksum> at heap offset 0 with ``algorithm``; True if it had to be added (at the start)."""
    element = child(toc, "checksum")
    added = element is None
    if element is None:
        element = make("checksum")
        element.tail = toc.text
        toc.insert(0, element)
    tail, attributes = element.tail, dict(element.attrib)
    element.clear()
    element.attrib.update(attributes)
    element.set("style", algorithm.hashlib_name)
    element.extend([make("offset", "0"), make("size", str(algorithm.digest_size))])
    indent(element, 2)
    element.tail = tail
    return added


def _refresh_signature_time(toc: Element, signed_at: datetime) -> None:
    """libxar's ``<signature-creation-time>`` (seconds since 2001, Apple's CFAbsoluteTime), when the
    input has one, says when the new signatures were made. signbridge does not add it."""
    for element in children(toc, SIGNATURE_TIME):
        element.text = f"{signed_at.timestamp() - _APPLE_EPOCH:.1f}"


def _move_offsets(file_element: Element, old_end: int, new_end: int, name: str) -> None:
    """Shift every heap offset below a <file>: its data, extended attributes, nested files, and any
    repeated <data> or <offset> (the TOC is kept whole; readers choose among repeats, see toc.py)."""
    for element in file_element.iter():
        offsets = list(children(element, "offset"))
        if not offsets:
            continue
        lengths = list(children(element, "length"))
        empty = bool(lengths) and _number(lengths[-1], name) == 0
        for offset in offsets:
            old = _number(offset, name)
            moved = new_end if empty and old < old_end else old - old_end + new_end
            if moved > MAX_INT:
                raise InvalidNumberError(f"{name}: a file's heap offset would exceed {MAX_INT} after signing")
            offset.text = str(moved)


def _number(element: Element, name: str) -> int:
    text = (element.text or "").strip()
    if not text.isdigit() or not text.isascii() or int(text) > MAX_INT:
        raise InvalidNumberError(f"{name}: the table of contents has <{local_name(element.tag)}> {text[:40]!r}")
    return int(text)


def _signature_position(toc: Element, old_position: int | None, added_checksum: bool) -> int:
    """Where the new signatures go: in the old ones' place, else before the first <file> (after the
    checksum, as Apple writes them); every other element keeps its place and order."""
    if old_position is not None:
        return old_position + added_checksum
    return next((i for i, e in enumerate(toc) if local_name(e.tag) == "file"), len(toc))


def _insert_signatures(
    toc: Element, position: int, offset: int, rsa_size: int | None, cms_size: int | None, certificates: list[bytes]
) -> None:
    tail = toc[position - 1].tail if position else toc.text
    for tag, style, size in ((SIGNATURE, "RSA", rsa_size), (X_SIGNATURE, "CMS", cms_size)):
        if size is None:
            continue
        element = make(tag, style=style)
        element.extend([make("offset", str(offset)), make("size", str(size))])
        key_info = make(f"{{{XMLDSIG_NS}}}KeyInfo")
        x509_data = make(f"{{{XMLDSIG_NS}}}X509Data")
        x509_data.extend(
            make(f"{{{XMLDSIG_NS}}}X509Certificate", base64.b64encode(der).decode("ascii")) for der in certificates
        )
        key_info.append(x509_data)
        element.append(key_info)
        indent(element, 2)
        element.tail = tail
        toc.insert(position, element)
        position += 1
        offset += size

