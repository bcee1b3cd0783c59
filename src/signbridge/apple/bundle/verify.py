"""Verifying bundles and app archives as ``codesign --verify`` does (Mach-O checks: :mod:`..macho.verify`).

A bundle is verified through its main executable, with Info.plist (slot 1) and CodeResources
(slot 3) bound to its signature, then every sealed resource and every piece of nested code. A
bundle without a main executable carries a detached signature in ``_CodeSignature/`` whose code is
the Info.plist (:mod:`.detached`); it goes through the same checks, Info.plist first, so an edited
Info.plist reports Apple's "invalid Info.plist (plist or signature have been modified)". With
``--deep``, bundles that a seal covers file by file (a ``.dext`` in ``Library/SystemExtensions``,
an iOS app's plug-ins) are verified in their own right too. An ``.ipa`` is unpacked into a private
temporary directory and its app verified; messages name the archive, not the temporary copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path

from ..codesig.blobs import CodeSignatureFormatError
from ..codesig.checks import (
    check_pages,
    check_signer,
    check_special_slots,
    check_timestamp,
    check_trust,
    check_unsealed_blobs,
)
from ..codesig.requirements.evaluation import evaluate
from ..codesig.signed_code import preferred_directory
from ..codesig.verdicts import (
    BoundFiles,
    SliceVerdict,
    Verdict,
    VerifyOptions,
    designated_of,
    requirement_context,
)
from ..codesig.verification import (
    BAD_BUNDLE,
    BAD_RESOURCE,
    INFO_PLIST_FAILED,
    INVALID_SYMLINK,
    MODIFIED,
    RESOURCE_DIRECTORY_FAILED,
    RESOURCES_NOT_FOUND,
    CodeVerificationError,
    NotSignedError,
    read_code_file,
)
from ..macho.verify import verify_macho_path
from .detached import read_detached_signature
from .ipa import extracted_app
from .layout import (
    Bundle,
    BundleError,
    BundleSymlinkError,
    UnsealedContentError,
    bundle_format,
    check_nesting,
)
from .resources.checking import SealProblem, SealProblemKind, verify_code_resources
from .resources.rules import ResourceError


def verify_ipa(path: Path, options: VerifyOptions, *, executor: Executor) -> Verdict:
    """Verify the app inside an ``.ipa``; locations in errors name ``<ipa>/Payload/...``."""
    with extracted_app(path) as app:
        prefix = str(app.parent.parent)
        try:
            verdict = verify_bundle(app, options, executor=executor)
        except CodeVerificationError as error:
            raise _relocated(error, prefix, str(path)) from None
    return dataclasses.replace(verdict, path=path)


def _relocated(error: CodeVerificationError, old: str, new: str) -> CodeVerificationError:
    def move(text: str) -> str:
        return text.replace(old, new)

    return error.replaced(
        detail=move(error.detail),
        subcomponent=move(error.subcomponent) if error.subcomponent else None,
        added=[move(item) for item in error.added],
        modified=[move(item) for item in error.modified],
        missing=[move(item) for item in error.missing],
    )


def _open_bundle(path: Path) -> Bundle:
    try:
        return Bundle.open(path)
    except BundleSymlinkError as exc:
        raise CodeVerificationError(INVALID_SYMLINK, str(exc)) from None
    except UnsealedContentError as exc:
        raise CodeVerificationError(str(exc).split(":", 1)[0], str(exc)) from None
    except BundleError as exc:
        raise CodeVerificationError(BAD_BUNDLE, str(exc)) from None


def verify_bundle(path: Path, options: VerifyOptions, *, executor: Executor, depth: int = 0) -> Verdict:
    """Verify a bundle: its code (main executable, or Info.plist under a detached signature) with
    Info.plist and CodeResources bound, every sealed resource, and its nested code (each verified
    in full, recursively, at most MAX_NESTING bundles deep)."""
    try:
        check_nesting(depth, path)
    except BundleError as exc:
        raise CodeVerificationError(BAD_BUNDLE, str(exc)) from None
    bundle = _open_bundle(path)
    code_resources = None
    if bundle.code_resources_path.is_file():
        code_resources = read_code_file(bundle.code_resources_path)
    bound = BoundFiles(read_code_file(bundle.info_plist_path), code_resources, is_bundle=True)
    if bundle.executable_path is None:
        verdict = verify_detached(bundle, bound, options, executor=executor)
    else:
        verdict = verify_macho_path(bundle.executable_path, options, bound=bound, executor=executor)
    if code_resources is None:
        raise CodeVerificationError(
            RESOURCES_NOT_FOUND, "the bundle has no _CodeSignature/CodeResources (it was not sealed)"
        )

    nested_failures: list[tuple[Path, CodeVerificationError]] = []
    nested_verdicts: list[Verdict] = []

    def nested_check(nested_path: Path) -> bytes:
        try:
            nested = verify_bundle(nested_path, options, executor=executor, depth=depth + 1) if nested_path.is_dir() else (
                verify_macho_path(nested_path, options, executor=executor)
            )
        except FileNotFoundError:
            error = CodeVerificationError(BAD_RESOURCE, f"nested code {nested_path} is missing")
            nested_failures.append((nested_path, error))
            raise error from None
        except CodeVerificationError as error:
            nested_failures.append((nested_path, error))
            raise
        nested_verdicts.append(nested)
        return nested.cdhash

    try:
        problems = verify_code_resources(bundle, code_resources, nested_check, executor=executor)
    except ResourceError as exc:
        raise CodeVerificationError(RESOURCE_DIRECTORY_FAILED, str(exc)) from None
    if nested_failures:
        nested_path, error = nested_failures[0]
        raise error.within(subcomponent=str(nested_path)) from None
    if problems:
        raise _resource_failure(bundle, problems)
    if options.deep:
        for sealed in _sealed_code(bundle):
            where = sealed.root if isinstance(sealed, Bundle) else sealed
            try:
                if isinstance(sealed, Bundle):
                    nested_verdicts.append(verify_bundle(where, options, executor=executor, depth=depth + 1))
                else:
                    nested_verdicts.append(verify_macho_path(where, options, executor=executor))
            except CodeVerificationError as error:
                raise error.within(subcomponent=str(where)) from None
    return Verdict(
        path=path,
        identifier=verdict.identifier,
        format=bundle_format(bundle, verdict.format if bundle.executable_path is not None else None),
        designated=verdict.designated,
        satisfies_designated=verdict.satisfies_designated,
        satisfies_requirement=verdict.satisfies_requirement,
        cdhash=verdict.cdhash,
        slices=verdict.slices,
        nested=tuple(nested_verdicts),
    )


def _sealed_code(bundle: Bundle) -> list[Bundle | Path]:
    try:
        return bundle.sealed_code()
    except BundleError as exc:
        raise CodeVerificationError(BAD_BUNDLE, str(exc)) from None


def verify_detached(
    bundle: Bundle, bound: BoundFiles, options: VerifyOptions, *, executor: Executor | None = None
) -> Verdict:
    """Verify the detached signature of a bundle without a main executable: its code is the
    Info.plist, one page; slot 1 is checked first, as Apple does."""
    try:
        detached = read_detached_signature(bundle.signature_dir)
    except CodeSignatureFormatError as exc:
        raise CodeVerificationError(MODIFIED, str(exc)) from None
    if detached is None:
        raise NotSignedError("the bundle has no main executable and no _CodeSignature/CodeDirectory")
    signature = detached.signature
    directories = signature.code_directories
    parsed_cms = check_signer(signature)
    for directory in directories:
        check_special_slots(directory, signature, None, bound)
    check_unsealed_blobs(signature, directories)
    code = bound.info_plist or b""
    for directory in directories:
        name = directory.hash_type.name.lower()
        if directory.code_limit != len(code) or len(directory.code_hashes) != 1:
            raise CodeVerificationError(
                INFO_PLIST_FAILED,
                f"the {name} CodeDirectory covers {directory.code_limit} bytes of Info.plist, "
                f"which now has {len(code)}",
            )
        check_pages(memoryview(code), directory, executor)
    timestamp = trust = None
    if parsed_cms is not None:
        timestamp = check_timestamp(parsed_cms, options)
        trust = check_trust(parsed_cms, options, timestamp)
    slice_verdict = SliceVerdict(None, signature, parsed_cms, trust, timestamp)
    context = requirement_context(slice_verdict, options, info_plist=bound.info_plist)
    designated = designated_of(signature, preferred_directory(directories), trust, options)
    explicit = evaluate(options.requirement, context) if options.requirement is not None else None
    return Verdict(
        path=bundle.root,
        identifier=preferred_directory(directories).identifier,
        format=bundle_format(bundle, None),
        designated=designated,
        satisfies_designated=evaluate(designated, context),
        satisfies_requirement=explicit,
        cdhash=preferred_directory(directories).cdhash(),
        slices=(slice_verdict,),
    )


def _resource_failure(bundle: Bundle, problems: Sequence[SealProblem]) -> CodeVerificationError:
    """Added, modified and missing files as Apple lists them (full paths), the rest in the detail."""
    added: list[str] = []
    modified: list[str] = []
    missing: list[str] = []
    other: list[str] = []
    listed = {
        SealProblemKind.ADDED: added,
        SealProblemKind.MODIFIED: modified,
        SealProblemKind.NESTED_MODIFIED: modified,
        SealProblemKind.MISSING: missing,
    }
    for problem in problems:
        paths = listed.get(problem.kind)
        if paths is None:
            other.append(str(problem))
        else:
            paths.append(str(bundle.root / problem.path))
    return CodeVerificationError(BAD_RESOURCE, "; ".join(other), added=added, modified=modified, missing=missing)
