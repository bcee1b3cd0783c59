"""Component packages: an app wrapped as ``PackageInfo`` + ``Payload`` in a flat (xar) package.

The ``Payload`` is what Installer.app extracts: a gzip-compressed cpio archive (the portable "odc"
format) of the install location's contents. No ``Bom`` is written; ``pkgutil --payload-files`` and
Installer build one when missing only on macOS, so this suits demos and tests, not distribution.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
from pathlib import Path
from xml.sax.saxutils import quoteattr

from ..apple.pkg.xar.writer import PackageEntry, write_package

_TRAILER = "TRAILER!!!"


def _cpio_header(name: str, mode: int, size: int, mtime: int, ino: int, nlink: int) -> bytes:
    fields = (
        "070707",
        f"{0:06o}",  # dev
        f"{ino:06o}",
        f"{mode:06o}",
        f"{0:06o}",  # uid: root
        f"{80:06o}",  # gid: admin, as Apple's payloads
        f"{nlink:06o}",
        f"{0:06o}",  # rdev
        f"{mtime:011o}",
        f"{len(name) + 1:06o}",
        f"{size:011o}",
    )
    return "".join(fields).encode() + name.encode() + b"\0"


def cpio_odc(item: Path, base: Path) -> bytes:
    """An odc cpio archive holding ``item`` (and everything under it) with names relative to ``base``."""
    out = io.BytesIO()
    paths = [item, *sorted(item.rglob("*"))] if item.is_dir() else [item]
    for ino, path in enumerate(paths, start=1):
        info = path.lstat()
        name = "./" + path.relative_to(base).as_posix()
        if stat.S_ISLNK(info.st_mode):
            data = os.readlink(path).encode()
        elif stat.S_ISREG(info.st_mode):
            data = path.read_bytes()
        else:
            data = b""
        nlink = 2 if stat.S_ISDIR(info.st_mode) else 1
        out.write(_cpio_header(name, info.st_mode, len(data), int(info.st_mtime), ino, nlink))
        out.write(data)
    out.write(_cpio_header(_TRAILER, 0, 0, 0, 0, 1))
    return out.getvalue()


def package_info(identifier: str, version: str, install_location: str, payload_files: int, size_kb: int) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<pkg-info format-version="2" identifier={quoteattr(identifier)} version={quoteattr(version)} '
        f'install-location={quoteattr(install_location)} auth="root">\n'
        f'    <payload numberOfFiles="{payload_files}" installKBytes="{size_kb}"/>\n'
        "</pkg-info>\n"
    ).encode()


def build_component_package(
    app: Path, output: Path, *, identifier: str, version: str = "1.0", install_location: str = "/Applications"
) -> Path:
    """Wrap ``app`` (a bundle) into a component package at ``output``, installing into ``install_location``."""
    archive = cpio_odc(app, app.parent)
    files = sum(1 for _ in app.rglob("*")) + 1
    size_kb = sum(p.lstat().st_size for p in app.rglob("*")) // 1024 + 1
    entries = [
        PackageEntry("PackageInfo", package_info(identifier, version, install_location, files, size_kb)),
        PackageEntry("Payload", gzip.compress(archive, mtime=0), compress=False),
    ]
    return write_package(output, entries)
