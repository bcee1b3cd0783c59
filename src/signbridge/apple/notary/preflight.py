"""The pre-flight: what Apple's notary service would reject, found offline before an upload.

For an app or other bundle, a zip of one, a flat package or a bare Mach-O file, every piece of
code inside is checked, recursively: nested bundles, Mach-O files anywhere (Resources too), the
contents of zip and jar files in a bundle, and the payloads of packages. Each problem is one
:class:`Problem` worded as the notary's log words it, with the path of the binary.

Validity is decided by the verifiers (``verify_code``, ``verify_package``): the outermost bundle
is verified deep (which covers its nested code and seal), every other Mach-O file on its own.
The notary's other rules are read from each slice's signature.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from ...crypto.cms import CmsFormatError
from ..bundle.detached import read_detached_signature
from ..codesig import cms
from ..codesig.blobs import CodeSignatureFormatError
from ..codesig.codedirectory import CodeDirectoryFlags, HashType
from ..codesig.embedded_signature import EmbeddedSignature, read_signature
from ..codesig.entitlements import signature_entitlements
from ..codesig.verdicts import VerifyOptions
from ..codesig.verification import (
    CERT_EXPIRED,
    CERT_NOT_VALID_YET,
    NOT_TRUSTED,
    CodeVerificationError,
    NotSignedError,
)
from ..dmg.detect import looks_like_disk_image
from ..dmg.udif import DiskImageError, read_layout
from ..dmg.udif import read_signature as read_disk_image_signature
from ..dmg.verify import verify_disk_image
from ..macho.constants import MH_EXECUTE, MH_KEXT_BUNDLE
from ..macho.parse import MachO, MachOError, parse_file
from ..pkg.verify import PackageStatus, verify_package
from ..pkg.xar.archive import XarArchive
from ..pkg.xar.errors import XarError
from ..plist import plist_dict
from ..trust import CertificateKind, classify_certificate
from ..verify_code import verify_code
from .errors import PayloadError
from .payload import Limits, extract_cpio, extract_disk_image, extract_zip

NOT_SIGNED = "The binary is not signed."
INVALID = "The signature of the binary is invalid."
NOT_DEVELOPER_ID = "The binary is not signed with a valid Developer ID certificate."
NO_TIMESTAMP = "The signature does not include a secure timestamp."
NO_RUNTIME = "The executable does not have the hardened runtime enabled."
GET_TASK_ALLOW = "The executable requests the com.apple.security.get-task-allow entitlement."
WEAK_ALGORITHM = "The signature algorithm used is too weak."
OLD_SDK = "The binary uses an SDK older than the 10.9 SDK."
PACKAGE_NOT_SIGNED = "The package is not signed."
PACKAGE_INVALID = "The signature of the package is invalid."
PACKAGE_NOT_DEVELOPER_ID = "The package is not signed with a valid Developer ID Installer certificate."
UNREADABLE = "The archive could not be read."

PLATFORM_MACOS = 1
SDK_10_9 = 0x000A0900
_TRUST_STATUSES = (NOT_TRUSTED, CERT_EXPIRED, CERT_NOT_VALID_YET)
_MACHO_MAGICS = {b"\xfe\xed\xfa\xce", b"\xce\xfa\xed\xfe", b"\xfe\xed\xfa\xcf", b"\xcf\xfa\xed\xfe"}
_FAT_MAGICS = {b"\xca\xfe\xba\xbe", b"\xca\xfe\xba\xbf"}
_BUNDLE_SUFFIXES = {
    ".app", ".framework", ".bundle", ".plugin", ".appex", ".xpc", ".kext", ".dext", ".systemextension",
    ".qlgenerator", ".mdimporter", ".saver", ".prefpane", ".driver", ".action", ".wdgt",
}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        found = {"path": self.path, "message": self.message}
        if self.detail:
            found["detail"] = self.detail
        return found


@dataclass
class Preflight:
    """One pre-flight run: the anchors Developer ID certificates must chain to, and the limits."""

    anchors: tuple[x509.Certificate, ...] = ()
    limits: Limits = field(default_factory=Limits)
    at: datetime | None = None
    problems: list[Problem] = field(default_factory=list)
    _roots: list[tuple[Path, str]] = field(default_factory=list, repr=False)
    _work: Path | None = field(default=None, repr=False)

    @property
    def _options(self) -> VerifyOptions:
        return VerifyOptions(anchors=self.anchors, at=self.at, strict=True, deep=True)

    def run(self, path: str | Path) -> list[Problem]:
        """Check ``path``; returns (and keeps in :attr:`problems`) what the notary would reject."""
        target = Path(path)
        if not target.exists():
            raise FileNotFoundError(2, "No such file or directory", str(target))
        start = len(self.problems)
        with self._workspace():
            self._roots.append((target.resolve(), str(path)))
            self._item(target.resolve(), top=True)
        return self.problems[start:]

    # --- bookkeeping -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _workspace(self) -> Iterator[None]:
        if self._work is not None:
            yield
            return
        self._work = Path(tempfile.mkdtemp(prefix="signbridge-preflight-"))
        try:
            yield
        finally:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
            self._roots.clear()

    def _show(self, path: Path) -> str:
        best: tuple[Path, str] | None = None
        for root, shown in self._roots:
            if (path == root or root in path.parents) and (best is None or len(root.parts) > len(best[0].parts)):
                best = (root, shown)
        if best is None:
            return str(path)
        relative = path.relative_to(best[0])
        return best[1] if relative == Path(".") else f"{best[1]}/{relative.as_posix()}"

    def _add(self, path: Path, message: str, detail: str = "") -> None:
        problem = Problem(self._show(path), message, detail)
        if all((p.path, p.message) != (problem.path, problem.message) for p in self.problems):
            self.problems.append(problem)

    def _scratch(self, name: str) -> Path:
        assert self._work is not None
        return Path(tempfile.mkdtemp(prefix=f"{name[:40]}.", dir=self._work))

    # --- dispatch ----------------------------------------------------------------------------

    def _item(self, path: Path, *, top: bool = False) -> None:
        if path.is_symlink():
            return
        if path.is_dir():
            if _is_bundle(path):
                self._bundle(path, outermost=True)
            else:
                self._tree(path)
            return
        head = _head(path)
        if looks_like_disk_image(path):
            self._disk_image(path)
        elif head[:4] == b"xar!":
            self._package(path)
        elif head[:4] == b"PK\x03\x04":
            self._zip(path)
        elif _is_macho(path, head):
            self._loose_macho(path)
        elif top:
            self._add(path, "The file is not an app, a package, a disk image, a zip of one, or Mach-O code.")

    def _tree(self, directory: Path, *, skip: frozenset[Path] = frozenset(), inside_bundle: bool = False) -> None:
        for entry in sorted(directory.iterdir()):
            if entry in skip or entry.is_symlink() or entry.name == "_CodeSignature":
                continue
            if entry.is_dir():
                if _is_bundle(entry):
                    self._bundle(entry, outermost=not inside_bundle)
                else:
                    self._tree(entry, skip=skip, inside_bundle=inside_bundle)
                continue
            head = _head(entry)
            if _is_macho(entry, head):
                self._loose_macho(entry)
            elif head[:4] == b"PK\x03\x04" and entry.suffix.lower() in (".zip", ".jar"):
                self._zip(entry)
            elif head[:4] == b"xar!":
                self._package(entry)
            elif entry.suffix.lower() == ".dmg" and looks_like_disk_image(entry):
                self._disk_image(entry)

    # --- code ----------------------------------------------------------------------------------

    def _bundle(self, root: Path, *, outermost: bool) -> None:
        executable = _main_executable(root)
        if outermost:
            try:
                verify_code(root, self._options)
            except NotSignedError:
                self._add(executable or root, NOT_SIGNED)
            except CodeVerificationError as error:
                where = Path(error.subcomponent) if error.subcomponent else root
                if where.is_dir():
                    where = _main_executable(where) or where
                elif where == root:
                    where = executable or root
                if error.status in _TRUST_STATUSES:
                    self._add(where, NOT_DEVELOPER_ID, error.detail)
                else:
                    self._add(where, INVALID, error.detail or error.status)
            except FileNotFoundError as exc:
                self._add(root, INVALID, str(exc))
        if executable is not None:
            self._rules(executable)
        elif not _main_executable_named(root):
            self._detached_rules(root)
        skip = frozenset({executable}) if executable else frozenset()
        self._tree(root, skip=skip, inside_bundle=True)

    def _loose_macho(self, path: Path) -> None:
        if _not_code(path):
            return
        try:
            verify_code(path, self._options)
        except NotSignedError:
            self._add(path, NOT_SIGNED)
            return
        except CodeVerificationError as error:
            if error.status not in _TRUST_STATUSES:
                self._add(path, INVALID, error.detail or error.status)
                return
            self._add(path, NOT_DEVELOPER_ID, error.detail)
        self._rules(path)

    def _rules(self, path: Path) -> None:
        """The notary's rules that a signature shows, for every slice of a Mach-O file."""
        try:
            parsed = parse_file(path.read_bytes())
        except (OSError, MachOError) as exc:
            self._add(path, INVALID, f"the Mach-O file cannot be read: {exc}")
            return
        found: list[str] = []
        for macho in parsed.slices:
            try:
                signature = read_signature(macho)
                found += _signature_rules(signature, macho)
            except (CodeSignatureFormatError, CmsFormatError, ValueError) as exc:
                self._add(path, INVALID, str(exc))
                return
        self._add_in_order(path, found)

    def _detached_rules(self, root: Path) -> None:
        """The rules for a bundle without an executable: its detached signature in _CodeSignature/."""
        folder = root / "Contents" / "_CodeSignature" if (root / "Contents").is_dir() else root / "_CodeSignature"
        try:
            detached = read_detached_signature(folder)
            found = _signature_rules(detached.signature if detached else None, None)
        except (CodeSignatureFormatError, CmsFormatError, ValueError) as exc:
            self._add(root, INVALID, str(exc))
            return
        self._add_in_order(root, found)

    def _add_in_order(self, path: Path, found: list[str]) -> None:
        for message in _RULE_ORDER:
            if message in found:
                self._add(path, message)

    # --- containers ----------------------------------------------------------------------------

    def _zip(self, path: Path) -> None:
        self._contents(path, extract_zip)

    def _contents(self, path: Path, extract: Callable[[Path, Path, Limits, str], int]) -> None:
        """Extract an archive or image into the scratch space, within the limits, and walk it."""
        destination = self._scratch(path.name)
        try:
            extract(path, destination, self.limits, self._show(path))
        except PayloadError as exc:
            self._add(path, UNREADABLE, str(exc))
            return
        self._roots.append((destination, self._show(path)))
        self._tree(destination)

    def _package(self, path: Path) -> None:
        verdict = verify_package(path, self.anchors, at=self.at)
        if verdict.status is PackageStatus.NO_SIGNATURE:
            self._add(path, PACKAGE_NOT_SIGNED)
        elif verdict.status in (PackageStatus.TRUSTED, PackageStatus.UNTRUSTED, PackageStatus.EXPIRED):
            leaf = verdict.chain[0] if verdict.chain else None
            if (
                verdict.status is not PackageStatus.TRUSTED
                or leaf is None
                or classify_certificate(leaf) is not CertificateKind.DEVELOPER_ID_INSTALLER
            ):
                self._add(path, PACKAGE_NOT_DEVELOPER_ID, "; ".join(verdict.problems))
            if verdict.timestamp is None:
                self._add(path, NO_TIMESTAMP)
        else:
            self._add(path, PACKAGE_INVALID, "; ".join(verdict.problems) or verdict.status_text)
            return
        self._payloads(path)

    def _disk_image(self, path: Path) -> None:
        """The image's own signature (optional for the notary, but then Developer ID and
        timestamped), then every piece of code in its file system."""
        try:
            verify_disk_image(path, self._options)
        except CodeVerificationError as error:
            # an unsigned image is accepted by the notary: only what is inside counts then
            if error.status in _TRUST_STATUSES:
                self._add(path, NOT_DEVELOPER_ID, error.detail)
            elif not isinstance(error, NotSignedError):
                self._add(path, INVALID, error.detail or error.status)
        self._disk_image_rules(path)
        self._contents(path, extract_disk_image)

    def _disk_image_rules(self, path: Path) -> None:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError as exc:
            self._add(path, UNREADABLE, str(exc))
            return
        try:
            read = read_disk_image_signature(read_layout(path, descriptor), descriptor)
            if read is not None and read.signature is not None:
                found = _signature_rules(read.signature, None)
                self._add_in_order(path, [m for m in found if m != NOT_SIGNED])
        except (DiskImageError, CodeSignatureFormatError, CmsFormatError, ValueError) as exc:
            self._add(path, INVALID, str(exc))
        finally:
            os.close(descriptor)

    def _payloads(self, path: Path) -> None:
        try:
            archive = XarArchive.open(path)
        except XarError as exc:
            self._add(path, PACKAGE_INVALID, str(exc))
            return
        for entry in archive.toc.files:
            if entry.type != "file" or entry.path.rsplit("/", 1)[-1] != "Payload":
                continue
            shown = f"{self._show(path)}/{entry.path}"
            destination = self._scratch("Payload")
            compressed = destination.parent / f"{destination.name}.data"
            try:
                with compressed.open("w+b") as stream:
                    archive.copy_data(entry, stream)
                    stream.seek(0)
                    extract_cpio(stream, destination, self.limits, shown)
            except (PayloadError, XarError) as exc:
                self._add(path, UNREADABLE, str(exc))
                continue
            finally:
                compressed.unlink(missing_ok=True)
            self._roots.append((destination, shown))
            self._tree(destination)


_RULE_ORDER = (NOT_SIGNED, NOT_DEVELOPER_ID, NO_TIMESTAMP, NO_RUNTIME, GET_TASK_ALLOW, WEAK_ALGORITHM, OLD_SDK)


def _signature_rules(signature: EmbeddedSignature | None, macho: MachO | None) -> list[str]:
    """The rules one signature breaks; ``macho`` is the slice it belongs to (None: detached)."""
    if signature is None:
        return [NOT_SIGNED]
    found = []
    directories = signature.code_directories
    flags = directories[0].flags
    leaf_kind, timestamped = None, False
    if not flags & CodeDirectoryFlags.ADHOC and signature.cms:
        parsed_cms = cms.parse_signed_data(signature.cms)
        leaf_kind = classify_certificate(parsed_cms.signer_certificate)
        timestamped = parsed_cms.timestamp is not None
    if leaf_kind is not CertificateKind.DEVELOPER_ID_APPLICATION:
        found.append(NOT_DEVELOPER_ID)
    if not timestamped:
        found.append(NO_TIMESTAMP)
    if _truthy((signature_entitlements(signature)[0] or {}).get("com.apple.security.get-task-allow")):
        found.append(GET_TASK_ALLOW)
    if all(directory.hash_type == HashType.SHA1 for directory in directories):
        found.append(WEAK_ALGORITHM)
    if macho is not None:
        if macho.filetype == MH_EXECUTE and not flags & CodeDirectoryFlags.RUNTIME:
            found.append(NO_RUNTIME)
        version = macho.build_version
        if version is None and macho.filetype != MH_KEXT_BUNDLE or (
            version is not None and version.platform == PLATFORM_MACOS and version.sdk < SDK_10_9
        ):
            found.append(OLD_SDK)
    return found


def _head(path: Path) -> bytes:
    try:
        with path.open("rb") as stream:
            return stream.read(8)
    except OSError:
        return b""


_NOT_CODE_FILE_TYPES = {0x1, 0x4, 0xA}  # MH_OBJECT, MH_CORE, MH_DSYM: never loaded, never signed


def _not_code(path: Path) -> bool:
    """Object files, core dumps and dSYM debug companions are Mach-O but not code the notary checks."""
    try:
        parsed = parse_file(path.read_bytes())
    except (OSError, MachOError):
        return False
    return all(macho.filetype in _NOT_CODE_FILE_TYPES for macho in parsed.slices)


def _is_macho(path: Path, head: bytes) -> bool:
    if head[:4] in _MACHO_MAGICS:
        return True
    if head[:4] in _FAT_MAGICS:
        # Java class files share 0xcafebabe; there the next word is a version number, not a slice count.
        return 0 < int.from_bytes(head[4:8], "big") < 32
    return False


def _is_bundle(directory: Path) -> bool:
    if directory.suffix.lower() not in _BUNDLE_SUFFIXES:
        return False
    return any((directory / relative).is_file() for relative in ("Contents/Info.plist", "Resources/Info.plist", "Info.plist"))


def _main_executable_named(root: Path) -> bool:
    """Whether the bundle's Info.plist names a main executable (present or not)."""
    for info in ("Contents/Info.plist", "Resources/Info.plist", "Info.plist"):
        document = _info_plist(root / info)
        if document is not None:
            return bool(document.get("CFBundleExecutable"))
    return False


def _info_plist(path: Path) -> dict[str, Any] | None:
    """A bundle's Info.plist when it is there and readable as a dictionary."""
    try:
        return plist_dict(path.read_bytes())
    except OSError:
        return None


def _main_executable(root: Path) -> Path | None:
    """The bundle's main executable as its Info.plist names it, wherever the layout puts it."""
    for info, folder in (
        ("Contents/Info.plist", "Contents/MacOS"),
        ("Resources/Info.plist", "."),
        ("Info.plist", "."),
    ):
        document = _info_plist(root / info)
        if document is None:
            continue
        name = document.get("CFBundleExecutable")
        if isinstance(name, str) and name and "/" not in name:
            candidate = (root / folder / name).resolve()
            inside = candidate.is_relative_to(root.resolve())
            return candidate if inside and candidate.is_file() else None
        return None
    return None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value) and value is not None


def preflight(
    paths: list[str | Path], anchors: tuple[x509.Certificate, ...] = (), limits: Limits | None = None
) -> list[Problem]:
    """Pre-flight every path; the problems of all of them, in order."""
    run = Preflight(anchors=anchors, limits=limits or Limits())
    for path in paths:
        run.run(path)
    return run.problems
