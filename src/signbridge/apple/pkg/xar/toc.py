"""The table of contents of a xar archive: what it says about the checksum, signatures and files.

A TOC looks like this (offsets are relative to the heap, which starts right after the
compressed TOC)::

    <xar><toc>
      <checksum style="sha1"><offset>0</offset><size>20</size></checksum>
      <signature style="RSA"><offset>20</offset><size>256</size><KeyInfo …/></signature>
      <x-signature style="CMS"><offset>276</offset><size>N</size><KeyInfo …/></x-signature>
      <file id="1"><name>Distribution</name><type>file</type>
        <data><length>…</length><offset>…</offset><size>…</size>
          <encoding style="application/x-gzip"/>
          <archived-checksum style="sha1">hex</archived-checksum>
          <extracted-checksum style="sha1">hex</extracted-checksum></data>
      </file> …
    </toc></xar>

``parse_toc`` checks every number and name it reads and returns an immutable summary plus the
element tree (kept for re-signing, which edits a copy of it).

Real TOCs hold more than this model: pkgbuild since 2022 writes every ``<name>`` of a ``<file>``
twice, Apple's tools add ``<FinderCreateTime>``, ``<deviceno>``, ``<inode>``, ``<ea>`` and ``id``
attributes, and libxar writes a file's properties in the reverse of the order it read them. The
reader ignores what it does not model (re-signing keeps it) and reads a repeated property of a
``<file>`` as libxar does: libxar puts each property it reads at the head of the file's property
list and looks properties up from the head, so the *last* of several ``<name>`` (or ``<type>``,
``<data>``, ``<offset>``...) in document order is the one that counts; extraction paths
(``fspath``) are likewise overwritten by each ``<name>`` read. bsdtar instead joins repeated
names (``PayloadPayload``), which no installer does. The TOC's own ``<checksum>``,
``<signature>`` and ``<x-signature>`` must each appear at most once: a second one would let two
readers check different bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from .errors import DuplicateSignatureError, InvalidNumberError, MalformedTocError
from .header import MAX_INT
from .tocxml import Element, child, children, local_name, parse_xml

SIGNATURE = "signature"  # classic signature, RSA over the TOC checksum
X_SIGNATURE = "x-signature"  # extended signature, CMS over the TOC checksum
OCTET_STREAM = "application/octet-stream"

_DIGITS = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True)
class HeapRange:
    """Bytes of the heap: ``offset`` from the heap's start, ``length`` bytes long."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class FileChecksum:
    style: str  # "sha1", "md5", "sha256", "sha512"
    digest: bytes


@dataclass(frozen=True)
class FileData:
    """Where a file's bytes sit in the heap and how they are stored."""

    offset: int
    length: int  # stored bytes in the heap
    size: int  # bytes once decoded
    encoding: str  # application/octet-stream, application/x-gzip (zlib), x-bzip2, x-lzma, x-xz
    archived_checksum: FileChecksum | None  # over the stored bytes
    extracted_checksum: FileChecksum | None  # over the decoded bytes

    @property
    def heap_range(self) -> HeapRange:
        return HeapRange(self.offset, self.length)


@dataclass(frozen=True)
class XarFile:
    id: str
    path: str  # names from the root joined with "/"
    type: str  # "file", "directory", "symlink", "hardlink", …
    mode: int | None
    data: FileData | None
    other_ranges: tuple[HeapRange, ...] = ()  # further heap data, e.g. extended attributes (<ea>)

    @property
    def heap_ranges(self) -> tuple[HeapRange, ...]:
        return ((self.data.heap_range,) if self.data else ()) + self.other_ranges


@dataclass(frozen=True)
class ChecksumSlot:
    """``<checksum>``: where the TOC checksum sits in the heap."""

    style: str
    offset: int
    size: int

    @property
    def heap_range(self) -> HeapRange:
        return HeapRange(self.offset, self.size)


@dataclass(frozen=True)
class SignatureSlot:
    """``<signature>`` or ``<x-signature>``: a signature's place in the heap and its certificates."""

    element: str  # SIGNATURE or X_SIGNATURE
    style: str  # "RSA", "CMS"
    offset: int
    size: int
    certificates: tuple[bytes, ...]  # DER, leaf first

    @property
    def heap_range(self) -> HeapRange:
        return HeapRange(self.offset, self.size)


@dataclass(frozen=True)
class Toc:
    root: Element = field(compare=False, repr=False)  # treat as read-only; re-signing edits a copy
    checksum: ChecksumSlot | None
    signature: SignatureSlot | None
    x_signature: SignatureSlot | None
    files: tuple[XarFile, ...]

    @property
    def signatures(self) -> tuple[SignatureSlot, ...]:
        return tuple(slot for slot in (self.signature, self.x_signature) if slot is not None)

    def heap_ranges(self) -> list[tuple[str, HeapRange]]:
        """Every heap range the TOC refers to, each with a description for error messages."""
        ranges = [("the TOC checksum", self.checksum.heap_range)] if self.checksum else []
        ranges += [(f"the <{slot.element}> data", slot.heap_range) for slot in self.signatures]
        ranges += [(f"data of {file.path!r}", r) for file in self.files for r in file.heap_ranges]
        return ranges


def parse_toc(xml: bytes, name: str) -> Toc:
    """Read a decompressed TOC; ``name`` is how the package is called in error messages."""
    root = parse_xml(xml, name)
    reader = _Reader(name)
    if local_name(root.tag) != "xar":
        raise MalformedTocError(f"{name}: the table of contents has <{local_name(root.tag)}> where <xar> belongs")
    toc = reader.only(root, "toc", "<xar>", required=True)
    checksum = reader.checksum(toc)
    signature = reader.signature(toc, SIGNATURE)
    x_signature = reader.signature(toc, X_SIGNATURE)
    files: list[XarFile] = []
    for element in children(toc, "file"):
        reader.files(element, "", files)
    return Toc(root, checksum, signature, x_signature, tuple(files))


class _Reader:
    def __init__(self, name: str) -> None:
        self.name = name

    def fail(self, message: str) -> MalformedTocError:
        return MalformedTocError(f"{self.name}: {message}")

    def only(self, parent: Element, tag: str, where: str, *, required: bool = False) -> Element | None:
        found = list(children(parent, tag))
        if len(found) > 1:
            raise self.fail(f"the table of contents has {len(found)} <{tag}> elements in {where}")
        if required and not found:
            raise self.fail(f"the table of contents has no <{tag}> in {where}")
        return found[0] if found else None

    def last(self, parent: Element, tag: str, where: str, *, required: bool = False) -> Element | None:
        """A property of a file: the last of its kind, as libxar reads it (see the module documentation)."""
        found = None
        for candidate in children(parent, tag):
            found = candidate
        if required and found is None:
            raise self.fail(f"the table of contents has no <{tag}> in {where}")
        return found

    def number(self, parent: Element, tag: str, where: str, *, repeated: bool = False) -> int:
        """The whole number in ``<tag>``; with ``repeated``, of the last ``<tag>`` (file properties)."""
        element = (self.last if repeated else self.only)(parent, tag, where, required=True)
        text = (element.text or "").strip()
        if not _DIGITS.fullmatch(text) or int(text) > MAX_INT:
            raise InvalidNumberError(
                f"{self.name}: the table of contents gives <{tag}> of {where} as {text[:40]!r}, "
                f"which is not a whole number from 0 to {MAX_INT}"
            )
        return int(text)

    def checksum(self, toc: Element) -> ChecksumSlot | None:
        element = self.only(toc, "checksum", "<toc>")
        if element is None:
            return None
        style = (element.get("style") or "").lower()
        return ChecksumSlot(style, self.number(element, "offset", "<checksum>"), self.number(element, "size", "<checksum>"))

    def signature(self, toc: Element, tag: str) -> SignatureSlot | None:
        found = list(children(toc, tag))
        if len(found) > 1:
            raise DuplicateSignatureError(
                f"{self.name} has {len(found)} <{tag}> elements in its table of contents; a package carries "
                "at most one of each kind, so it was altered or built wrongly"
            )
        if not found:
            return None
        element = found[0]
        where = f"<{tag}>"
        style = element.get("style") or ""
        certificates: list[bytes] = []
        for key_info in children(element, "KeyInfo"):
            for x509_data in children(key_info, "X509Data"):
                for cert in children(x509_data, "X509Certificate"):
                    certificates.append(self.base64(cert.text or "", f"an <X509Certificate> in {where}"))
        offset = self.number(element, "offset", where)
        return SignatureSlot(tag, style, offset, self.number(element, "size", where), tuple(certificates))

    def base64(self, text: str, what: str) -> bytes:
        try:
            return base64.b64decode("".join(text.split()), validate=True)
        except binascii.Error:
            raise self.fail(f"{what} is not valid base64") from None

    def files(self, element: Element, parent_path: str, out: list[XarFile]) -> None:
        file_name = self.file_name(element, parent_path)
        path = f"{parent_path}/{file_name}" if parent_path else file_name
        where = f"{path!r}"
        type_element = self.last(element, "type", where)
        mode_element = self.last(element, "mode", where)
        mode = None
        if mode_element is not None:
            text = (mode_element.text or "").strip()
            if not re.fullmatch(r"[0-7]{1,7}", text):
                raise InvalidNumberError(f"{self.name}: the mode of {where} is {text[:20]!r}, not an octal number")
            mode = int(text, 8)
        data_element = self.last(element, "data", where)
        data = self.data(data_element, where) if data_element is not None else None
        others = [
            self.range(e, f"<{local_name(e.tag)}> of {where}") for e in self.other_heap_elements(element, data_element)
        ]
        out.append(
            XarFile(
                element.get("id") or "",
                path,
                (type_element.text or "").strip() if type_element is not None else "file",
                mode,
                data,
                tuple(others),
            )
        )
        for sub in children(element, "file"):
            self.files(sub, path, out)

    def file_name(self, element: Element, parent_path: str) -> str:
        """The name libxar gives the file: the last ``<name>``. Every one must be a safe name."""
        where = f"a <file> in {parent_path!r}" if parent_path else "a <file>"
        names = [self.name_text(name, where) for name in children(element, "name")]
        if not names:
            raise self.fail(f"the table of contents has no <name> in {where}")
        for file_name in names:
            if file_name in ("", ".", "..") or "/" in file_name or "\0" in file_name:
                raise self.fail(f"the table of contents names a file {file_name[:80]!r}, which is not a safe file name")
        return names[-1]

    def name_text(self, element: Element, where: str) -> str:
        """A ``<name>``'s text; libxar writes names it cannot store as Latin-1 as ``enctype="base64"`` UTF-8."""
        text = element.text or ""
        if element.get("enctype") != "base64":
            return text
        try:
            return self.base64(text, f"a base64 <name> in {where}").decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"a base64 <name> in {where} is not UTF-8 text") from None

    def other_heap_elements(self, file_element: Element, data_element: Element | None) -> list[Element]:
        """Elements below this <file> (not in nested files) other than its <data> that point into the heap:
        extended attributes (<ea>), and any repeated <data> libxar does not read (it is still in the heap)."""
        found: list[Element] = []
        stack = [c for c in file_element if local_name(c.tag) != "file" and c is not data_element]
        while stack:
            element = stack.pop()
            if child(element, "offset") is not None:
                found.append(element)
            stack.extend(c for c in element if local_name(c.tag) != "offset")
        return found

    def range(self, element: Element, where: str) -> HeapRange:
        return HeapRange(
            self.number(element, "offset", where, repeated=True), self.number(element, "length", where, repeated=True)
        )

    def data(self, element: Element, where: str) -> FileData:
        where = f"the data of {where}"
        encoding_element = self.last(element, "encoding", where)
        encoding = OCTET_STREAM
        if encoding_element is not None:
            encoding = (encoding_element.get("style") or OCTET_STREAM).strip()
        return FileData(
            self.number(element, "offset", where, repeated=True),
            self.number(element, "length", where, repeated=True),
            self.number(element, "size", where, repeated=True),
            encoding,
            self.file_checksum(element, "archived-checksum", where),
            self.file_checksum(element, "extracted-checksum", where),
        )

    def file_checksum(self, element: Element, tag: str, where: str) -> FileChecksum | None:
        found = self.last(element, tag, where)
        if found is None:
            return None
        text = (found.text or "").strip()
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            raise self.fail(f"the <{tag}> of {where} is {text[:40]!r}, not a hexadecimal digest") from None
        return FileChecksum((found.get("style") or "").lower(), digest)
