"""Helpers for the xar tests: sample trees, bsdtar/openssl/dd wrappers, a second xar parser, raw builders.

Everything here is independent of ``signbridge.apple.pkg.xar``: packages are inspected with struct,
zlib and the standard library's ElementTree, and checked with bsdtar, openssl and dd, so that a
bug in the code under test cannot hide itself.

libarchive 3.6 (Debian 12's bsdtar) only knows TOC checksums none/SHA-1/MD5 and refuses a package
whose header names SHA-256 or SHA-512 as "Unrecognized archive format". For those, bsdtar is shown
a copy whose header says "no checksum" (the only change); the TOC checksum itself is then checked
with ``openssl dgst`` on the TOC bytes cut out with dd.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import require_tool, run
from pkikit import certificate, name, new_key
from signbridge.apple.pkg.xar.signing import PreparedPackage, write_signed

MAGIC = b"xar!"
APPLE_CHECKSUM_NUMBERS = {"none": 0, "sha1": 1, "md5": 2, "sha256": 3, "sha512": 4}
BSDTAR_CHECKSUMS = {0, 1, 2}
DSIG = "{http://www.w3.org/2000/09/xmldsig#}"

DISTRIBUTION = b"""<?xml version="1.0" encoding="utf-8"?>
<installer-gui-script minSpecVersion="2">
    <title>Demo</title>
    <pkg-ref id="com.example.demo">#app.pkg</pkg-ref>
    <choices-outline><line choice="default"/></choices-outline>
</installer-gui-script>
"""
PACKAGE_INFO = b'<pkg-info format-version="2" identifier="com.example.demo" version="1.0" install-location="/"/>\n'


def sample_files() -> dict[str, bytes]:
    """A product archive's members: path -> contents (random parts make the data incompressible)."""
    rng = _Random(7)
    return {
        "Distribution": DISTRIBUTION,
        "Resources/en.lproj/Welcome.txt": b"Welcome to the demo.\n" * 40,
        "app.pkg/PackageInfo": PACKAGE_INFO,
        "app.pkg/Bom": rng.bytes(3000),
        "app.pkg/Payload": rng.bytes(300_000),
        "app.pkg/Scripts": b"",
    }


class _Random:
    """Deterministic bytes (SHA-256 in counter mode), so failures reproduce."""

    def __init__(self, seed: int) -> None:
        self.seed = seed.to_bytes(8, "big")

    def bytes(self, n: int) -> bytes:
        blocks = (hashlib.sha256(self.seed + i.to_bytes(8, "big")).digest() for i in range((n + 31) // 32))
        self.seed = hashlib.sha256(self.seed).digest()[:8]
        return b"".join(blocks)[:n]


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def bsdtar_create(source_dir: Path, out: Path, *options: str) -> Path:
    """``bsdtar --format xar`` of a directory's contents; options are xar:key=value strings.

    They go into one ``--options`` list: bsdtar keeps only the last of several ``--options``.
    """
    bsdtar = require_tool("bsdtar")
    args = [bsdtar, "--format", "xar"] + (["--options", ",".join(options)] if options else [])
    run([*args, "-cf", str(out), "-C", str(source_dir), "."])
    return out


def bsdtar_readable(path: Path, scratch: Path) -> Path:
    """The package itself, or for SHA-256/512 TOCs a copy whose header says "no checksum"."""
    data = path.read_bytes()
    if struct.unpack(">I", data[24:28])[0] in BSDTAR_CHECKSUMS:
        return path
    copy = scratch / f"{path.name}.nochecksum"
    copy.write_bytes(data[:24] + b"\0\0\0\0" + data[28:])
    return copy


def bsdtar_list(path: Path, scratch: Path) -> set[str]:
    bsdtar = require_tool("bsdtar")
    out = run([bsdtar, "-tf", str(bsdtar_readable(path, scratch))], text=True).stdout
    return {line.removeprefix("./").rstrip("/") for line in out.splitlines() if line.strip() not in ("", ".", "./")}


def bsdtar_list_verbose(path: Path, scratch: Path) -> str:
    bsdtar = require_tool("bsdtar")
    return run([bsdtar, "-tvf", str(bsdtar_readable(path, scratch))], text=True).stdout


def bsdtar_extract(path: Path, scratch: Path, *, xattrs: bool = True) -> dict[str, bytes]:
    """Extract with bsdtar (which checks every file's archived and extracted checksum). Without
    ``xattrs`` extended attributes are not restored (tmpfs refuses Apple's)."""
    bsdtar = require_tool("bsdtar")
    dest = scratch / f"{path.name}.extracted"
    dest.mkdir()
    options = [] if xattrs else ["--no-xattrs"]
    run([bsdtar, *options, "-xf", str(bsdtar_readable(path, scratch)), "-C", str(dest)])
    return {
        str(p.relative_to(dest)): p.read_bytes() for p in sorted(dest.rglob("*")) if p.is_file()
    }


def dd_cut(path: Path, skip: int, count: int, out: Path) -> bytes:
    """Bytes ``skip``..``skip+count`` of a file, cut out by dd."""
    dd = require_tool("dd")
    run([dd, f"if={path}", f"of={out}", "bs=1M", f"skip={skip}", f"count={count}", "iflag=skip_bytes,count_bytes"])
    return out.read_bytes()


def openssl_digest(algorithm: str, path: Path) -> bytes:
    openssl = require_tool("openssl")
    return run([openssl, "dgst", f"-{algorithm}", "-binary", str(path)]).stdout


@dataclass
class Layout:
    """A package as a second, minimal parser sees it."""

    header_size: int
    toc_compressed_length: int
    toc_uncompressed_length: int
    checksum_number: int
    toc: ET.Element
    heap_offset: int

    def toc_element(self) -> ET.Element:
        return self.toc.find("toc")

    def slot(self, tag: str) -> tuple[int, int]:
        """(heap offset, size) of <checksum>, <signature> or <x-signature>."""
        element = self.toc_element().find(tag)
        return int(element.findtext("offset")), int(element.findtext("size"))

    def count(self, tag: str) -> int:
        return len(self.toc_element().findall(tag))

    def certificates(self, tag: str) -> list[str]:
        return [e.text for e in self.toc_element().find(tag).iter(f"{DSIG}X509Certificate")]

    def file_ranges(self) -> dict[str, tuple[int, int]]:
        """path -> (heap offset, length) of each file's <data>."""
        ranges: dict[str, tuple[int, int]] = {}

        def walk(element: ET.Element, prefix: str) -> None:
            for f in element.findall("file"):
                path = prefix + f.findtext("name")
                data = f.find("data")
                if data is not None:
                    ranges[path] = (int(data.findtext("offset")), int(data.findtext("length")))
                walk(f, path + "/")

        walk(self.toc_element(), "")
        return ranges


def read_layout(path: Path) -> Layout:
    data = path.read_bytes()
    magic, size, version, compressed, uncompressed, checksum = struct.unpack(">4sHHQQI", data[:28])
    assert magic == MAGIC and version == 1
    toc = ET.fromstring(zlib.decompress(data[size : size + compressed]))
    return Layout(size, compressed, uncompressed, checksum, toc, size + compressed)


def heap_bytes(path: Path, layout: Layout, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(layout.heap_offset + offset)
        return f.read(length)


class OpensslSigner:
    """A throwaway RSA key and self-signed certificate, used through the openssl command line."""

    def __init__(self, directory: Path, bits: int = 2048, name: str = "signer") -> None:
        self.openssl = require_tool("openssl")
        self.dir = directory
        self.key = directory / f"{name}.key.pem"
        self.cert = directory / f"{name}.cert.pem"
        run([
            self.openssl, "req", "-x509", "-newkey", f"rsa:{bits}", "-nodes", "-keyout", str(self.key),
            "-out", str(self.cert), "-subj", f"/CN=Developer ID Installer: Test {name} (TEAMID1234)", "-days", "2",
        ])
        self.cert_der = run([self.openssl, "x509", "-in", str(self.cert), "-outform", "DER"]).stdout
        self.size = bits // 8
        self._n = 0

    def _file(self, data: bytes, suffix: str) -> Path:
        self._n += 1
        path = self.dir / f"{self._n}.{suffix}"
        path.write_bytes(data)
        return path

    def rsa_sign(self, checksum: bytes, algorithm: str) -> bytes:
        """PKCS#1 v1.5 over DigestInfo(algorithm, checksum): the checksum is the message hash."""
        inp = self._file(checksum, "checksum")
        out = self.dir / f"{self._n}.rsa"
        run([self.openssl, "pkeyutl", "-sign", "-inkey", str(self.key), "-pkeyopt", f"digest:{algorithm}",
             "-in", str(inp), "-out", str(out)])
        return out.read_bytes()

    def rsa_verify(self, signature: bytes, checksum: bytes, algorithm: str) -> subprocess.CompletedProcess:
        sig = self._file(signature, "sig")
        inp = self._file(checksum, "checksum")
        return subprocess.run(
            [self.openssl, "pkeyutl", "-verify", "-certin", "-inkey", str(self.cert), "-pkeyopt",
             f"digest:{algorithm}", "-in", str(inp), "-sigfile", str(sig)],
            capture_output=True, text=True,
        )

    def cms_sign(self, checksum: bytes) -> bytes:
        """A stand-in CMS: detached SignedData over the checksum, no signed attributes."""
        inp = self._file(checksum, "checksum")
        out = self.dir / f"{self._n}.cms"
        run([self.openssl, "cms", "-sign", "-binary", "-noattr", "-in", str(inp), "-signer", str(self.cert),
             "-inkey", str(self.key), "-outform", "DER", "-out", str(out)])
        return out.read_bytes()

    def cms_verify(self, cms: bytes, checksum: bytes) -> subprocess.CompletedProcess:
        sig = self._file(cms, "cms")
        inp = self._file(checksum, "checksum")
        return subprocess.run(
            [self.openssl, "cms", "-verify", "-binary", "-inform", "DER", "-in", str(sig), "-content", str(inp),
             "-noverify", "-out", os.devnull],
            capture_output=True, text=True,
        )


def raw_xar(
    path: Path,
    toc_xml: bytes | str,
    heap: bytes = b"",
    *,
    checksum: str = "sha1",
    compressed: bytes | None = None,
    header: bytes | None = None,
) -> Path:
    """A package assembled by hand: header, zlib TOC, the TOC checksum at heap 0 (unless "none"), ``heap``.

    ``compressed`` and ``header`` replace the computed ones, to build damaged packages.
    """
    if isinstance(toc_xml, str):
        toc_xml = toc_xml.encode()
    toc = zlib.compress(toc_xml) if compressed is None else compressed
    number = APPLE_CHECKSUM_NUMBERS[checksum]
    if header is None:
        header = struct.pack(">4sHHQQI", MAGIC, 28, 1, len(toc), len(toc_xml), number)
    digest = b"" if checksum == "none" else hashlib.new(checksum, toc).digest()
    path.write_bytes(header + toc + digest + heap)
    return path


def toc_document(body: str, checksum: str = "sha1") -> str:
    """A TOC with a <checksum> at heap 0 (sized for ``checksum``) followed by ``body``."""
    size = 0 if checksum == "none" else hashlib.new(checksum).digest_size
    checksum_xml = "" if checksum == "none" else (
        f'<checksum style="{checksum}"><offset>0</offset><size>{size}</size></checksum>'
    )
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<xar><toc>{checksum_xml}{body}</toc></xar>\n'


def file_xml(name: str, offset: int, length: int, size: int | None = None, file_id: int = 1, extra: str = "") -> str:
    return (
        f'<file id="{file_id}"><name>{name}</name><type>file</type><data><length>{length}</length>'
        f'<offset>{offset}</offset><size>{length if size is None else size}</size>'
        f'<encoding style="application/octet-stream"/></data>{extra}</file>'
    )


def trailer(kind: int, length: int) -> bytes:
    """A notarization ticket trailer record ("t8lr", little-endian)."""
    return struct.pack("<4sHHII", b"t8lr", 1, kind, length, 0)


def staple(path: Path, ticket: bytes) -> None:
    with open(path, "ab") as f:
        f.write(trailer(1, 0) + ticket + trailer(2, len(ticket)))


def notarization_ticket(*covered: bytes, issued: int = 1_700_000_000) -> bytes:
    """A ticket shaped as Apple's notary service issues them ('s8ch': certificates, 'g8tk' content
    listing the ``covered`` hashes, ECDSA P-256 signature zero-padded to 72 bytes), signed by a throwaway key."""
    key = new_key("p256")
    der = certificate(name("Test Software Ticket Signing"), key).public_bytes(serialization.Encoding.DER)
    certificates = b"\x30\x82" + len(der).to_bytes(2, "big") + der
    content = struct.pack("<4sHHIIQ", b"g8tk", 2, 20, len(covered), 0, issued)
    content += b"".join(bytes([1 if len(h) == 20 else 2]) + h[:20] for h in covered)
    signed = struct.pack("<4sIII", b"s8ch", 1, len(certificates), len(content)) + certificates + content
    signature = key.sign(signed, ec.ECDSA(hashes.SHA256()))
    return signed + signature.ljust(72, b"\0")


def toc_checksum(path: Path) -> bytes:
    """The TOC checksum stored in a package's heap, read with the minimal parser."""
    layout = read_layout(path)
    return heap_bytes(path, layout, *layout.slot("checksum"))


def notarize(path: Path) -> bytes:
    """Staple a notarization ticket for the package (its TOC checksum); returns the ticket."""
    ticket = notarization_ticket(toc_checksum(path), hashlib.sha256(b"some cdhash").digest())
    staple(path, ticket)
    return ticket


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- packages shaped as Apple's pkgbuild and productbuild write them today ---------------------------

_FINDER = "<FinderCreateTime><nanoseconds>0</nanoseconds><time>1900-01-00T11:18:24</time></FinderCreateTime>"
_OWNER = (
    "<ctime>2026-04-26T14:04:29Z</ctime><mtime>2026-04-26T14:04:29Z</mtime><atime>2026-04-26T14:04:29Z</atime>"
    "<group>staff</group><gid>20</gid><user>builder</user><uid>501</uid>"
)
_EA_DATA = b"UTF-8;134217984"


def pkgbuild_package(path: Path, files: dict[str, bytes], *, gzip: tuple[str, ...] = ()) -> Path:
    """An unsigned package whose TOC has today's pkgbuild/productbuild shape: each file's properties in
    libxar's reversed order (<data> first, <name> last), every <name> written twice, Finder, inode and
    owner metadata, ``id`` attributes on files and on an extended attribute (<ea>), an element and an
    attribute no reader models. Paths with "/" become nested <file>s in directories (a product
    archive's component package: ``Tool.pkg/Payload``). Files named in ``gzip`` are stored compressed."""
    heap = bytearray()
    ids = iter(range(1, 10_000))
    tree: dict = {}
    for file_path, data in files.items():
        node = tree
        for part in file_path.split("/")[:-1]:
            node = node.setdefault(part, {})
        node[file_path.rsplit("/", 1)[-1]] = (file_path, data)

    def stored_xml(tag: str, data: bytes, compress: bool, extra: str = "", attributes: str = "") -> str:
        stored = zlib.compress(data, 9) if compress else data
        offset = 20 + len(heap)
        heap.extend(stored)
        encoding = "application/x-gzip" if compress else "application/octet-stream"
        return (
            f"<{tag}{attributes}><length>{len(stored)}</length><encoding style=\"{encoding}\"/>"
            f"<offset>{offset}</offset><size>{len(data)}</size>"
            f'<extracted-checksum style="sha1">{hashlib.sha1(data).hexdigest()}</extracted-checksum>'
            f'<archived-checksum style="sha1">{hashlib.sha1(stored).hexdigest()}</archived-checksum>{extra}</{tag}>'
        )

    def file_xml_of(name: str, entry) -> str:  # noqa: ANN001 - a (path, bytes) pair or a directory dict
        number = next(ids)
        if isinstance(entry, dict):
            inner = "".join(file_xml_of(child, value) for child, value in entry.items())
            return (
                f'<file id="{number}">{_FINDER}{_OWNER}<mode>0755</mode><deviceno>16777234</deviceno>'
                f"<inode>{40000 + number}</inode><type>directory</type><name>{name}</name><name>{name}</name>"
                f"{inner}</file>"
            )
        file_path, data = entry
        ea = ""
        if number == 1:
            ea = stored_xml("ea", _EA_DATA, True, "<name>com.apple.TextEncoding</name>", ' id="0"')
        return (
            f'<file id="{number}" x-vendor="kept">{stored_xml("data", data, file_path in gzip)}{ea}{_FINDER}{_OWNER}'
            f"<mode>0644</mode><deviceno>16777234</deviceno><inode>{40000 + number}</inode><type>file</type>"
            f"<name>{name}</name><name>{name}</name></file>"
        )

    body = "".join(file_xml_of(name, entry) for name, entry in tree.items())
    toc = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<xar>\n <toc>\n  <creation-time>2026-04-26T14:04:30</creation-time>\n'
        '  <checksum style="sha1">\n   <offset>0</offset>\n   <size>20</size>\n  </checksum>\n'
        f'  <x-vendor-note id="note-1" flavour="unknown">kept as it is</x-vendor-note>\n  {body}\n </toc>\n</xar>\n'
    )
    return raw_xar(path, toc, bytes(heap))


def toc_shape(path: Path) -> tuple[list[tuple[str, tuple, str]], list[int]]:
    """What re-signing must keep of a TOC: every element outside the checksum and the signatures, in
    document order, as (path of tags, attributes, text), with heap offsets taken out into a list."""
    shape: list[tuple[str, tuple, str]] = []
    offsets: list[int] = []

    def walk(element: ET.Element, where: str) -> None:
        for sub in element:
            tag = sub.tag.rpartition("}")[2]
            if where == "xar/toc" and tag in ("checksum", "signature", "x-signature"):
                continue
            here = f"{where}/{tag}"
            text = (sub.text or "").strip()
            if tag == "offset":
                offsets.append(int(text))
                text = "<offset>"
            shape.append((here, tuple(sorted(sub.attrib.items())), text))
            walk(sub, here)

    walk(read_layout(path).toc, "xar")
    return shape, offsets


def check_file_checksums(path: Path) -> int:
    """Hash every file's (and extended attribute's) stored bytes in the heap with hashlib and compare
    them with the archived checksum, and the decoded bytes with the extracted one; returns how many
    were checked. Independent of the code under test."""
    layout = read_layout(path)
    checked = 0
    for element in layout.toc_element().iter():
        archived = element.find("archived-checksum")
        if archived is None or element.find("offset") is None:
            continue
        stored = heap_bytes(path, layout, int(element.findall("offset")[-1].text),
                            int(element.findall("length")[-1].text))  # fmt: skip
        assert hashlib.new(archived.get("style"), stored).hexdigest() == archived.text.strip(), element.tag
        extracted = element.find("extracted-checksum")
        encoding = element.find("encoding").get("style")
        if extracted is not None and encoding in ("application/x-gzip", "application/octet-stream"):
            data = zlib.decompress(stored) if encoding == "application/x-gzip" else stored
            assert hashlib.new(extracted.get("style"), data).hexdigest() == extracted.text.strip(), element.tag
        checked += 1
    return checked


def finish(
    prepared: PreparedPackage, rsa: bytes | None, cms: bytes | None, out: Path, *, check_files: bool = True
) -> Path:
    """Write ``prepared`` signed with signatures made beforehand (by openssl, or deliberately wrong)."""
    return write_signed(prepared, out, lambda _: (rsa, cms), check_files=check_files)
