"""iOS app archives (``.ipa``): a zip file holding ``Payload/<Name>.app``.

:func:`extracted_app` unpacks the app into a private temporary directory for reading or signing,
refusing what could write outside it or exhaust the disk: entries outside ``Payload/``, absolute
paths, ``..`` components, symbolic links that point outside the app, more than one app, and
declared sizes beyond :data:`MAX_TOTAL_SIZE` or compression ratios beyond :data:`MAX_RATIO`.
:func:`write_ipa` zips a (signed) app into a new archive beside the target and renames it over
the target, so the input is replaced whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ...errors import SignbridgeError

# zipfile, shutil and tempfile are imported where an archive is read or written: every reader of a
# Mach-O file asks is_ipa, and those imports cost a tenth of `codesign -dvvv`'s start-up.
if TYPE_CHECKING:
    import zipfile

PAYLOAD = "Payload"
MAX_TOTAL_SIZE = 8 << 30  # declared uncompressed bytes an archive may unpack to
MAX_RATIO = 1000  # declared size / compressed size of one entry, above RATIO_FLOOR
RATIO_FLOOR = 16 << 20
_COPY_CHUNK = 1 << 20
def zip_errors() -> tuple[type[BaseException], ...]:
    """What zipfile raises on a damaged archive, when it opens it or reads an entry: a bad structure
    or an impossible offset (OSError from seek), a truncated or corrupt compressed stream, an
    unsupported compression method, an encrypted entry (RuntimeError), a UTF-8 name that is not UTF-8."""
    import lzma
    import zipfile
    import zlib

    return (
        zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, RuntimeError,
        zlib.error, lzma.LZMAError, UnicodeDecodeError,
    )  # fmt: skip


class IpaError(SignbridgeError):
    """The .ipa cannot be read or written as an iOS app archive."""


class UnsafeIpaError(IpaError):
    """An entry of the .ipa would land outside the app or is too large to unpack."""


def is_ipa(path: Path) -> bool:
    """Whether ``path`` is a file that should be treated as an app archive."""
    return path.suffix.lower() == ".ipa" and path.is_file()


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    name = info.filename
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeIpaError(f"the archive entry {name!r} has an absolute path")
    parts = tuple(part for part in PurePosixPath(name).parts if part not in ("", "."))
    if any(part == ".." for part in parts):
        raise UnsafeIpaError(f"the archive entry {name!r} climbs out of the archive with '..'")
    if not parts or parts[0] != PAYLOAD:
        raise UnsafeIpaError(f"the archive entry {name!r} is outside Payload/")
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _check_sizes(infos: list[zipfile.ZipInfo]) -> None:
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise UnsafeIpaError(
                f"the archive entry {info.filename!r} claims {info.file_size} bytes from "
                f"{info.compress_size} compressed bytes; refusing to unpack it"
            )
    if total > MAX_TOTAL_SIZE:
        raise UnsafeIpaError(
            f"the archive would unpack to {total} bytes, more than the {MAX_TOTAL_SIZE} allowed"
        )


def _app_name(entries: list[tuple[zipfile.ZipInfo, tuple[str, ...]]]) -> str:
    apps = {parts[1] for _, parts in entries if len(parts) >= 2}
    if len(apps) != 1 or not next(iter(apps)).endswith(".app"):
        found = ", ".join(sorted(apps)) or "nothing"
        raise IpaError(f"an .ipa holds exactly one Payload/<Name>.app; this one holds {found}")
    return next(iter(apps))


def extract(archive: Path, destination: Path) -> Path:
    """Unpack the app of ``archive`` under ``destination`` (an empty private directory); its path."""
    import zipfile

    try:
        zipped = zipfile.ZipFile(archive)
    except zip_errors() as exc:
        raise IpaError(f"cannot read the .ipa as a zip archive: {exc}") from None
    with zipped:
        infos = zipped.infolist()
        entries = [(info, _entry_parts(info)) for info in infos]
        _check_sizes(infos)
        app = _app_name(entries)
        try:
            links = _unpack(zipped, entries, destination)
        except FileExistsError as exc:
            raise UnsafeIpaError(f"the archive holds {exc.filename} twice, or as a file and a folder") from None
        except OSError as exc:
            raise IpaError(f"cannot unpack the .ipa: {exc.strerror or exc}") from None
    root = destination / PAYLOAD / app
    real_root = os.path.realpath(root)
    for name, target in links:
        resolved = os.path.realpath(target)
        if resolved != real_root and not resolved.startswith(real_root + os.sep):
            raise UnsafeIpaError(f"the symbolic link {name!r} leads outside the app")
    if not root.is_dir():
        raise IpaError(f"Payload/{app} in the .ipa is not a directory")
    return root


def _unpack(
    zipped: zipfile.ZipFile, entries: list[tuple[zipfile.ZipInfo, tuple[str, ...]]], destination: Path
) -> list[tuple[str, Path]]:
    """Write the entries; symbolic links last, so that nothing is written through one."""
    links: list[tuple[zipfile.ZipInfo, Path, str]] = []
    for info, parts in entries:
        target = destination.joinpath(*parts)
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif _is_symlink(info):
            link = _read_link(zipped, info)
            _check_link(info.filename, parts, link)
            links.append((info, target, link))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            _extract_file(zipped, info, target)
    for _, target, link in links:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link, target)
    return [(info.filename, target) for info, target, _ in links]


def _read_link(zipped: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    if info.file_size > 4096:
        raise UnsafeIpaError(f"the symbolic link {info.filename!r} claims a {info.file_size}-byte target")
    try:
        return zipped.read(info).decode("utf-8", errors="replace")
    except zip_errors() as exc:
        raise IpaError(f"the archive entry {info.filename!r} cannot be read: {exc}") from None


def _check_link(name: str, parts: tuple[str, ...], link: str) -> None:
    if link.startswith("/"):
        raise UnsafeIpaError(f"the symbolic link {name!r} points to the absolute path {link!r}")
    depth = len(parts) - 3  # directories below Payload/<Name>.app
    for part in PurePosixPath(link).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise UnsafeIpaError(f"the symbolic link {name!r} -> {link!r} points outside the app")


def _extract_file(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> None:
    mode = (info.external_attr >> 16) & 0o777 if info.create_system == 3 else 0
    written = 0
    try:
        with zipped.open(info) as source, open(target, "xb") as output:
            while chunk := source.read(_COPY_CHUNK):
                written += len(chunk)
                if written > info.file_size:
                    raise UnsafeIpaError(f"the archive entry {info.filename!r} is larger than it declares")
                output.write(chunk)
    except zip_errors() as exc:
        raise IpaError(f"the archive entry {info.filename!r} cannot be read: {exc}") from None
    os.chmod(target, mode or 0o644)


@contextlib.contextmanager
def extracted_app(archive: Path) -> Iterator[Path]:
    """The app of ``archive``, unpacked into a private temporary directory removed afterwards."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="signbridge-ipa."))
    try:
        yield extract(archive, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_ipa(app: Path, target: Path) -> None:
    """Zip ``app`` as ``Payload/<app name>`` into a new archive and rename it over ``target``."""
    import zipfile

    from ...atomic import atomic_path

    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o644
    with (
        atomic_path(target, mode, suffix=".sb-signing") as temporary,
        zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as output,
    ):
        _add_directory(output, Path(PAYLOAD))
        _add_tree(output, app, Path(PAYLOAD) / app.name)


def _add_directory(output: zipfile.ZipFile, name: Path) -> None:
    import zipfile

    info = zipfile.ZipInfo(f"{name.as_posix()}/")
    info.create_system = 3
    info.external_attr = (stat.S_IFDIR | 0o755) << 16 | 0x10
    output.writestr(info, b"")


def _add_tree(output: zipfile.ZipFile, directory: Path, name: Path) -> None:
    import shutil
    import zipfile

    _add_directory(output, name)
    for entry in sorted(os.listdir(directory)):
        path = directory / entry
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            info = zipfile.ZipInfo((name / entry).as_posix())
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o755) << 16
            output.writestr(info, os.readlink(path).encode())
        elif stat.S_ISDIR(mode):
            _add_tree(output, path, name / entry)
        else:
            info = zipfile.ZipInfo.from_file(path, (name / entry).as_posix())
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as source, output.open(info, "w") as sink:
                shutil.copyfileobj(source, sink, _COPY_CHUNK)
