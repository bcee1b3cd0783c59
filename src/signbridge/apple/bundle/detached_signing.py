"""Writing the detached signature of a bundle without a main executable (layout: :mod:`.detached`).

The code is the Info.plist: each CodeDirectory has one code slot (page size 0) over its bytes,
and special slots 1 (Info.plist), 2 (requirements) and 3 (CodeResources). The primary
CodeDirectory goes to ``CodeDirectory``, alternates to ``CodeRequirements-1``..., the requirement
set to ``CodeRequirements`` and the CMS to ``CodeSignature`` (empty for ad hoc). Components of an
earlier signature that this one does not write are removed, so none is left unsealed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ...atomic import write_atomically
from ..codesig.blobs import Slot
from ..codesig.codedirectory import CodeDirectory, CodeDirectoryFlags, HashType, build_code_directory
from ..codesig.signer import CmsSigner
from .detached import (
    CODE_DIRECTORY_FILE,
    REQUIREMENTS_FILE,
    SIGNATURE_FILE,
    alternate_file,
    component_files,
)
from .layout import Bundle


@dataclass(frozen=True)
class DetachedSigningOptions:
    identifier: str
    hash_types: tuple[HashType, ...]  # the primary first
    requirements: bytes
    flags: int = 0
    team_id: str | None = None


def sign_detached_bundle(
    bundle: Bundle,
    code_resources: bytes,
    options: DetachedSigningOptions,
    signer: CmsSigner | None,
) -> tuple[CodeDirectory, ...]:
    """Write the detached signature files of ``bundle`` (whose seal is ``code_resources``, already
    written); returns the CodeDirectories, primary first. ``signer`` None signs ad hoc."""
    info_plist = bundle.info_plist_path.read_bytes()
    flags = options.flags & ~(CodeDirectoryFlags.LINKER_SIGNED | CodeDirectoryFlags.ADHOC)
    if signer is None:
        flags |= CodeDirectoryFlags.ADHOC
    slots = {Slot.INFO_PLIST: info_plist, Slot.REQUIREMENTS: options.requirements, Slot.RESOURCE_DIR: code_resources}
    directories = tuple(
        build_code_directory(
            info_plist,
            identifier=options.identifier,
            hash_type=hash_type,
            flags=flags,
            team_id=options.team_id,
            special_slot_data=slots,
            page_size=0,
        )
        for hash_type in options.hash_types
    )
    cms = signer.sign(directories) if signer is not None else b""
    folder = bundle.signature_dir
    written = {
        CODE_DIRECTORY_FILE: directories[0].blob,
        REQUIREMENTS_FILE: options.requirements,
        SIGNATURE_FILE: cms,
    }
    for index, directory in enumerate(directories[1:]):
        written[alternate_file(index)] = directory.blob
    for name in component_files():
        if name not in written:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
    for name, data in written.items():
        write_atomically(folder / name, data, fsync=True, make_parents=True)
    return directories
