"""How verifying code fails, for every verifier (Mach-O, bundle, disk image) and its callers:
Apple's sentences (Security framework error strings, as codesign prints them after the path) and
:class:`CodeVerificationError`, whose ``status`` is one of them and whose ``detail`` names exactly
what failed; :func:`read_code_file` reads a file a signature covers with that error. What a
verification concludes is in :mod:`signbridge.apple.codesig.verdicts`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import SignbridgeError

# Apple's sentences (Security framework error strings), as codesign prints them after the path.
UNSIGNED = "code object is not signed at all"
MODIFIED = "invalid signature (code or signature have been modified)"
BAD_RESOURCE = "a sealed resource is missing or invalid"
INFO_PLIST_FAILED = "invalid Info.plist (plist or signature have been modified)"
RESOURCE_DIRECTORY_FAILED = "invalid resource directory (directory or signature have been modified)"
RESOURCES_NOT_FOUND = "code has no resources but signature indicates they must be present"
RESOURCES_NOT_SEALED = "resources are present but not sealed by signature"
NOT_TRUSTED = "CSSMERR_TP_NOT_TRUSTED"
CERT_EXPIRED = "CSSMERR_TP_CERT_EXPIRED"
CERT_NOT_VALID_YET = "CSSMERR_TP_CERT_NOT_VALID_YET"
REQUIREMENT_FAILED = "code failed to satisfy specified code requirement(s)"
BAD_REQUIREMENT = "invalid or corrupted code requirement(s)"
INVALID_SYMLINK = "invalid destination for symbolic link in bundle"
BAD_BUNDLE = "bundle format unrecognized, invalid, or unsuitable"


# --- errors ---------------------------------------------------------------------------------------


class CodeVerificationError(SignbridgeError):
    """The code failed verification. ``str()`` is Apple's sentence; ``detail`` says what failed.

    ``architecture`` and ``subcomponent`` locate the failure like Apple's "In architecture:" and
    "In subcomponent:" lines; ``added``/``modified``/``missing`` list resource paths.
    """

    def __init__(
        self,
        status: str,
        detail: str = "",
        *,
        architecture: str | None = None,
        subcomponent: str | None = None,
        added: Sequence[str] = (),
        modified: Sequence[str] = (),
        missing: Sequence[str] = (),
    ) -> None:
        super().__init__(status)
        self.status = status
        self.detail = detail
        self.architecture = architecture
        self.subcomponent = subcomponent
        self.added = tuple(added)
        self.modified = tuple(modified)
        self.missing = tuple(missing)

    def lines(self) -> list[str]:
        """The lines after ``<path>: <status>``: location, resource lists, then the detail."""
        out = []
        if self.subcomponent:
            out.append(f"In subcomponent: {self.subcomponent}")
        if self.architecture:
            out.append(f"In architecture: {self.architecture}")
        out += [f"file added: {path}" for path in self.added]
        out += [f"file modified: {path}" for path in self.modified]
        out += [f"file missing: {path}" for path in self.missing]
        if self.detail:
            out.append(self.detail)
        return out

    def within(
        self, *, architecture: str | None = None, subcomponent: str | None = None
    ) -> CodeVerificationError:
        """The same failure located in a slice or nested piece of code (outermost location kept)."""
        return self.replaced(
            architecture=self.architecture or architecture, subcomponent=self.subcomponent or subcomponent
        )

    def replaced(self, **changes: Any) -> CodeVerificationError:
        """A copy of this error (of the same class) with some of its fields changed."""
        error = copy.copy(self)
        for name, value in changes.items():
            if name not in ("status", "detail", "architecture", "subcomponent", "added", "modified", "missing"):
                raise TypeError(f"CodeVerificationError has no field {name!r}")
            setattr(error, name, tuple(value) if name in ("added", "modified", "missing") else value)
        error.args = (error.status,)
        error.message = error.status
        return error


class NotSignedError(CodeVerificationError):
    def __init__(self, detail: str = "", **location: Any) -> None:
        super().__init__(UNSIGNED, detail, **location)


def read_code_file(path: Path) -> bytes:
    """The file's bytes; a file that exists but cannot be read fails verification."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CodeVerificationError(MODIFIED, f"{path} cannot be read: {exc.strerror or exc}") from None
