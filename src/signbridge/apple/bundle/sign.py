"""Signing bundles and app archives as ``codesign -s`` does (Mach-O files: :mod:`..macho.sign`).

A bundle is signed in a staged copy that replaces it only when every piece is signed: nested
code innermost first (with ``--deep``, including bundles that the seal covers file by file, such as
a ``.dext`` in ``Library/SystemExtensions``), then ``_CodeSignature/CodeResources``, then the main
executable with Info.plist in slot 1 and CodeResources in slot 3, or, for a bundle without a main
executable, a detached signature over its Info.plist (:mod:`.detached_signing`). An ``.ipa`` is
unpacked privately, its app signed, and a new archive renamed over the input.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Executor
from pathlib import Path

from ...atomic import write_atomically
from ..codesig.blobs import CodeSignatureFormatError
from ..codesig.code_files import mapped, read_code
from ..codesig.codedirectory import HashType
from ..codesig.embedded_signature import read_signature
from ..codesig.options import (
    AlreadySignedError,
    CodesignError,
    CodesignOptions,
    Progress,
    Reporter,
    SignedCode,
    UnreadableCodeError,
    UnsignedNestedCodeError,
    default_identifier,
    replacing_note,
)
from ..codesig.requirements.binary import cdhash as cdhash_requirement
from ..codesig.requirements.text import render
from ..codesig.signed_code import (
    preferred_directory,
    preferred_slice,
    stored_designated_requirement,
)
from ..codesig.signer import CmsSigner, requirement_set
from ..macho.parse import MachOError, parse_file
from ..macho.sign import (
    MachOJob,
    existing_signature_state,
    sign_macho_file,
    widest_default_hash_types,
)
from ..notary.stapled import remove_stapled_ticket
from .detached import has_detached_signature, read_detached_signature
from .detached_signing import DetachedSigningOptions, sign_detached_bundle
from .ipa import extracted_app, write_ipa
from .layout import Bundle, bundle_format, sign_bundle_plan
from .resources.hashing import DigestCache
from .resources.writing import NestedCode, build_code_resources, start_sealing
from .staging import staged_bundle


def sign_ipa(
    path: Path, signer: CmsSigner | None, options: CodesignOptions, reporter: Reporter, *, executor: Executor
) -> SignedCode:
    """Sign the app inside an ``.ipa``: unpack it privately, sign it, and replace the archive with
    a new one holding the signed app (the input is untouched on any failure)."""
    with extracted_app(path) as app:
        relocated = _RelocatedReporter(reporter, app.parent.parent, path)
        signed = sign_bundle(app, signer, options, relocated, executor=executor)
        try:
            write_ipa(app, path)
        except OSError as exc:
            raise UnreadableCodeError(f"cannot be written: {exc.strerror or exc}") from None
    return SignedCode(path, signed.identifier, signed.format, signed.cdhash, signed.requirement, signed.nested)


class _RelocatedReporter:
    """Notes about the unpacked copy of an archive, told about the archive itself."""

    def __init__(self, reporter: Reporter, unpacked: Path, archive: Path) -> None:
        self.reporter, self.unpacked, self.archive = reporter, unpacked, archive

    def note(self, path: Path, message: str) -> None:
        if path.is_relative_to(self.unpacked):
            path = self.archive / path.relative_to(self.unpacked)
        self.reporter.note(path, message)

    def progress(self, description: str) -> contextlib.AbstractContextManager[Progress]:
        return self.reporter.progress(description)


# --- bundles --------------------------------------------------------------------------------------


def bundle_signature_state(bundle: Bundle) -> str | None:
    """Like :func:`existing_signature_state` for a bundle's main executable and its seal."""
    if bundle.executable_path is None:
        return "signed" if has_detached_signature(bundle.signature_dir) else None
    with mapped(bundle.executable_path) as (data, _):
        try:
            state = existing_signature_state(parse_file(data))
        except MachOError:
            return "invalid"
    if state is None and bundle.code_resources_path.is_file():
        return "signed"
    return state


def nested_code_record(path: Path) -> NestedCode:
    """What a parent's seal records for nested code that is already signed (no ``--deep``): the
    cdhash of its preferred CodeDirectory and its designated requirement's text."""
    executable = path
    if path.is_dir():
        nested = Bundle.open(path)
        if not nested.code_resources_path.is_file():
            raise UnsignedNestedCodeError(path)
        if nested.executable_path is None:
            return _detached_code_record(path, nested)
        executable = nested.executable_path
    try:
        parsed = parse_file(read_code(executable))
        signature = read_signature(preferred_slice(parsed))
    except (MachOError, CodeSignatureFormatError) as exc:
        raise CodesignError(f"the signature of nested code {path} cannot be read: {exc}") from None
    if signature is None:
        raise UnsignedNestedCodeError(path)
    directory = preferred_directory(signature.code_directories)
    return NestedCode(directory.cdhash(), render(stored_designated_requirement(signature, directory)))


def _detached_code_record(path: Path, bundle: Bundle) -> NestedCode:
    try:
        detached = read_detached_signature(bundle.signature_dir)
    except CodeSignatureFormatError as exc:
        raise CodesignError(f"the signature of nested code {path} cannot be read: {exc}") from None
    if detached is None:
        raise UnsignedNestedCodeError(path)
    directory = preferred_directory(detached.signature.code_directories)
    requirement = stored_designated_requirement(detached.signature, directory)
    return NestedCode(directory.cdhash(), render(requirement))


def _seal_hash_types(bundle: Bundle, options: CodesignOptions) -> tuple[HashType, ...]:
    if options.hash_types:
        return options.hash_types
    if bundle.executable_path is None:
        return (HashType.SHA256,)
    with mapped(bundle.executable_path) as (data, _):
        return widest_default_hash_types(parse_file(data))


def _sign_one_bundle(
    bundle: Bundle,
    signer: CmsSigner | None,
    options: CodesignOptions,
    reporter: Reporter,
    nested: dict[Path, NestedCode],
    *,
    top: bool,
    executor: Executor,
    cache: DigestCache | None = None,
) -> SignedCode:
    records = {path: code for path, code in nested.items() if path.is_relative_to(bundle.content_root)}
    if not options.deep:
        for item in bundle.nested():
            item_path = item.root if isinstance(item, Bundle) else item
            if item_path not in records:
                records[item_path] = nested_code_record(item_path)
    with reporter.progress(f"sealing {bundle.root.name}") as advance:
        seal = build_code_resources(
            bundle,
            records,
            hash_types=_seal_hash_types(bundle, options),
            executor=executor,
            progress=advance,
            cache=cache,
        )
    write_atomically(bundle.code_resources_path, seal, fsync=True, make_parents=True)
    identifier = (options.identifier if top else None) or bundle.identifier
    if identifier is None:
        identifier = default_identifier(bundle.root, None, options.prefix)
    if bundle.executable_path is None:
        return _sign_detached(bundle, signer, options, seal, identifier)
    job = MachOJob(
        bundle.executable_path,
        identifier=identifier,
        info_plist=bundle.info_plist_path.read_bytes(),
        code_resources=seal,
        entitlements=top,
        nested=True,
    )
    signed = sign_macho_file(job, signer, options, reporter, executor=executor)
    executable_format = bundle_format(bundle, signed.format)
    return SignedCode(bundle.root, signed.identifier, executable_format, signed.cdhash, signed.requirement)


def _sign_detached(
    bundle: Bundle, signer: CmsSigner | None, options: CodesignOptions, seal: bytes, identifier: str
) -> SignedCode:
    """Sign a bundle without a main executable: a detached signature over its Info.plist."""
    settings = DetachedSigningOptions(
        identifier=identifier,
        hash_types=options.hash_types or (HashType.SHA256,),
        requirements=requirement_set(signer, identifier),
        flags=options.flags,
        team_id=signer.team_id if signer is not None else None,
    )
    directory = preferred_directory(sign_detached_bundle(bundle, seal, settings, signer))
    requirement = signer.designated_requirement(identifier) if signer is not None else None
    text = render(requirement if requirement is not None else cdhash_requirement(directory.cdhash()))
    return SignedCode(bundle.root, identifier, bundle_format(bundle, None), directory.cdhash(), text)


STALE_TICKET_WARNING = (
    "warning: the stapled notarization ticket was removed: it does not match the new signature. "
    "Notarize and staple the signed bundle again."
)


def sign_bundle(
    path: Path, signer: CmsSigner | None, options: CodesignOptions, reporter: Reporter, *, executor: Executor
) -> SignedCode:
    """Sign a bundle (and with ``options.deep`` all its nested code, innermost first) in a staged
    copy that replaces the original only when everything is signed."""
    original = Bundle.open(path)
    if original.executable_path is None and options.entitlements is not None:
        raise CodesignError("has no main executable to carry entitlements; sign it without --entitlements")
    state = bundle_signature_state(original)
    if state is not None:
        if not options.force:
            raise AlreadySignedError()
        reporter.note(path, replacing_note(state))
    with staged_bundle(original) as staged:
        root = original.moved_to(staged)
        plan = sign_bundle_plan(root) if options.deep else [root.root]
        done: dict[Path, NestedCode] = {}
        results: list[SignedCode] = []
        # The root's resources are hashed on a thread of their own while its nested code is signed.
        cache = start_sealing(root, _seal_hash_types(root, options))
        try:
            for item in plan:
                if item.is_dir():
                    bundle = root if item == root.root else Bundle.open(item)
                    if remove_stapled_ticket(bundle.content_root):
                        reporter.note(path / item.relative_to(root.root), STALE_TICKET_WARNING)
                    signed = _sign_one_bundle(
                        bundle, signer, options, reporter, done, top=bundle is root, executor=executor,
                        cache=cache if bundle is root else None,
                    )  # fmt: skip
                else:
                    job = MachOJob(item, entitlements=False, nested=True)
                    signed = sign_macho_file(job, signer, options, reporter, executor=executor)
                done[item] = NestedCode(signed.cdhash, signed.requirement or "")
                results.append(signed)
        finally:
            cache.finish()
    final = results[-1]
    nested = tuple(results[:-1])
    return SignedCode(path, final.identifier, final.format, final.cdhash, final.requirement, nested)
