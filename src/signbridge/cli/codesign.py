"""``signbridge codesign``: Apple's codesign command line, on any OS.

The arguments are parsed the way Apple's codesign parses them (getopt_long): short options may be
clustered (``-dvvv``, ``-fs ID``), long options may be abbreviated (``--ent``), ``-v`` means
``--verify`` unless another operation is given (then it raises the verbosity), and options with
optional values take them only after ``=`` (``--timestamp=URL``). Messages, the path prefixes and
the exit codes are Apple's: 0 success, 1 failure, 2 usage, 3 a requirement not satisfied.

    signbridge codesign -s "Developer ID Application" --timestamp -o runtime MyApp.app
    signbridge codesign --verify --strict --deep -vv MyApp.app
    signbridge codesign -dvvv MyApp.app
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SignbridgeError, UsageError
from .output import echo

if TYPE_CHECKING:
    from ..apple import display
    from ..apple.codesig.options import CodesignOptions
    from ..crypto.identity import Identity

DEPRECATED_COLON = "Warning: Specifying ':' in the path is deprecated and will not work in a future release"
EXIT_SUCCESS = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOVERIFY = 3

USAGE = (
    "Usage: signbridge codesign -s identity [-fv*] [-o flags] [-i ident] path ... # sign\n"
    "       signbridge codesign -v [-v*] [-R testreq] path ... # verify\n"
    "       signbridge codesign -d [options] path ... # display contents"
)

# name -> (takes an argument: "no" | "required" | "optional", short equivalent or key)
_LONG_OPTIONS: dict[str, tuple[str, str]] = {
    "architecture": ("required", "a"),
    "display": ("no", "d"),
    "dump": ("no", "d"),
    "force": ("no", "f"),
    "help": ("no", "help"),
    "identifier": ("required", "i"),
    "options": ("required", "o"),
    "requirements": ("required", "r"),
    "test-requirement": ("required", "R"),
    "sign": ("required", "s"),
    "verbose": ("optional", "verbose"),
    "verify": ("no", "verify"),
    "all-architectures": ("no", "all-architectures"),
    "check-expiry": ("no", "check-expiry"),
    "continue": ("no", "continue"),
    "deep": ("no", "deep"),
    "deep-verify": ("no", "deep"),
    "digest-algorithm": ("required", "digest-algorithm"),
    "entitlements": ("required", "entitlements"),
    "keychain": ("required", "token"),
    "token": ("required", "token"),
    "prefix": ("required", "prefix"),
    "runtime-version": ("required", "runtime-version"),
    "strict": ("optional", "strict"),
    "no-strict": ("no", "no-strict"),
    "timestamp": ("optional", "timestamp"),
    "xml": ("no", "xml"),
    "der": ("no", "der"),
}
_SHORT_WITH_ARGUMENT = set("aiorRs")
_SHORT_FLAGS = set("dfv")


@dataclass
class Arguments:
    """The parsed command line."""

    operation: str | None = None  # "sign" | "verify" | "display"
    verbose: int = 0
    identity: str | None = None
    force: bool = False
    identifier: str | None = None
    options: str | None = None
    requirements: str | None = None
    test_requirement: str | None = None
    architecture: str | None = None
    deep: bool = False
    strict: bool = False
    check_expiry: bool = False  # signbridge's own: expired certificates fail without a timestamp
    digest_algorithm: str | None = None
    entitlements: str | None = None
    token: str | None = None
    prefix: str | None = None
    runtime_version: str | None = None
    timestamp: str | None = None  # None: not given; "": without a URL; "none"; a URL
    continue_on_error: bool = False
    xml: bool = False
    der: bool = False
    help: bool = False
    paths: list[str] = field(default_factory=list)


class ArgumentError(UsageError):
    pass


def parse_arguments(argv: Sequence[str]) -> Arguments:
    """Parse codesign's command line (see the module documentation)."""
    parsed = Arguments()
    index = 0
    args = list(argv)

    def apply(key: str, value: str | None, *, long_verify: bool = False) -> None:
        if key == "s":
            parsed.identity = value
            parsed.operation = "sign"
        elif key == "d":
            parsed.operation = "display"
        elif key == "f":
            parsed.force = True
        elif key == "v":
            parsed.verbose += 1
        elif key == "verify":
            parsed.operation = "verify"
        elif key == "verbose":
            parsed.verbose = _number(value, "--verbose") if value is not None else parsed.verbose + 1
        elif key == "strict":
            parsed.strict = True
        elif key == "no-strict":
            parsed.strict = False
        elif key == "timestamp":
            parsed.timestamp = value if value is not None else ""
        elif key == "continue":
            parsed.continue_on_error = True
        elif key in ("deep", "force", "xml", "der", "help", "check-expiry"):
            setattr(parsed, key.replace("-", "_"), True)
        elif key == "all-architectures":
            parsed.architecture = None
        else:
            attribute = {
                "a": "architecture",
                "i": "identifier",
                "o": "options",
                "r": "requirements",
                "R": "test_requirement",
            }.get(key, key.replace("-", "_"))
            setattr(parsed, attribute, value)

    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            parsed.paths += args[index:]
            break
        if arg.startswith("--"):
            name, has_value, value = arg[2:].partition("=")
            full = _long_option(name)
            kind, key = _LONG_OPTIONS[full]
            if kind == "no" and has_value:
                raise ArgumentError(f"option '--{full}' doesn't allow an argument")
            if kind == "required" and not has_value:
                if index >= len(args):
                    raise ArgumentError(f"option '--{full}' requires an argument")
                value = args[index]
                index += 1
            apply(key, value if (has_value or kind == "required") else None)
            continue
        if arg.startswith("-") and len(arg) > 1:
            position = 1
            while position < len(arg):
                letter = arg[position]
                position += 1
                if letter in _SHORT_WITH_ARGUMENT:
                    value = arg[position:]
                    if not value:
                        if index >= len(args):
                            raise ArgumentError(f"option requires an argument -- '{letter}'")
                        value = args[index]
                        index += 1
                    apply(letter, value)
                    break
                if letter in _SHORT_FLAGS:
                    apply(letter, None)
                    continue
                raise ArgumentError(f"invalid option -- '{letter}'")
            continue
        parsed.paths.append(arg)
    # -v does double duty as -v(erbose) and -v(erify)
    if parsed.operation is None and parsed.verbose:
        parsed.operation = "verify"
        parsed.verbose -= 1
    return parsed


def _long_option(name: str) -> str:
    if name in _LONG_OPTIONS:
        return name
    matches = [option for option in _LONG_OPTIONS if option.startswith(name)] if name else []
    keys = {_LONG_OPTIONS[option] for option in matches}
    if len(keys) == 1:
        return matches[0]
    if not matches:
        raise ArgumentError(f"unrecognized option '--{name}'")
    possibilities = " ".join("--" + match for match in matches)
    raise ArgumentError(f"option '--{name}' is ambiguous; possibilities: {possibilities}")


def _number(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ArgumentError(f"{option} needs a number, not {value!r}") from None


def _runtime_version(text: str) -> int:
    parts = text.split(".")
    if not 1 <= len(parts) <= 3 or not all(part.isdigit() for part in parts):
        raise ArgumentError(f"--runtime-version: {text!r} is not a version such as 11.0.0")
    numbers = [int(part) for part in parts] + [0] * (3 - len(parts))
    if numbers[0] > 0xFFFF or numbers[1] > 0xFF or numbers[2] > 0xFF:
        raise ArgumentError(f"--runtime-version: {text!r} is out of range")
    return numbers[0] << 16 | numbers[1] << 8 | numbers[2]


# --- output ---------------------------------------------------------------------------------------


class Terminal:
    """Apple's ``note(level, ...)``: lines to standard error when verbose enough; progress bars on
    a terminal for long work."""

    def __init__(self, verbose: int) -> None:
        self.verbose = verbose
        self.interactive = sys.stderr.isatty()

    def note(self, level: int, text: str) -> None:
        if self.verbose >= level:
            echo(text, err=True)

    def error(self, text: str) -> None:
        echo(text, err=True)


class CliReporter:
    """The signing engine's reporter: notes as ``<path>: <message>``, rich progress on a terminal."""

    BYTES_THRESHOLD = 64 * 1024 * 1024  # show a bar for Mach-O files larger than this
    FILES_THRESHOLD = 200  # and for resource seals of more files than this

    def __init__(self, terminal: Terminal) -> None:
        self.terminal = terminal

    def note(self, path: Path, message: str) -> None:
        self.terminal.note(0, f"{path}: {message}")

    @contextlib.contextmanager
    def progress(self, description: str) -> Iterator[Callable[[int, int], None]]:
        if not self.terminal.interactive:
            yield lambda done, total: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: PLC0415

        threshold = self.FILES_THRESHOLD if description.startswith("sealing") else self.BYTES_THRESHOLD
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn(), transient=True,
            console=_stderr_console(),
        )  # fmt: skip
        task: list[object] = []

        def update(done: int, total: int) -> None:
            if not task:
                if total < threshold:
                    return
                bar.start()
                task.append(bar.add_task(description, total=total))
            bar.update(task[0], completed=done, total=total)  # type: ignore[arg-type]

        try:
            yield update
        finally:
            if task:
                bar.stop()


def _stderr_console():  # noqa: ANN202 - rich is imported lazily
    from rich.console import Console  # noqa: PLC0415

    return Console(stderr=True)


# --- the command ----------------------------------------------------------------------------------


def run(argv: Sequence[str]) -> int:
    """Sign, verify and display code signatures, as Apple's codesign does.

    \b
    codesign -s IDENTITY [-f] [--timestamp[=URL|none]] [-o runtime,...] [--entitlements FILE]
             [-i ID] [--prefix P] [--deep] [--digest-algorithm sha1,sha256] [--token NAME] PATH...
    codesign -v [--strict] [--deep] [-R REQUIREMENT] [-v] PATH...
    codesign -d [-v...] [-r-] [--entitlements -] PATH...

    IDENTITY is a certificate's SHA-1 or SHA-256 or part of its common name, found in the
    running signbridge tokens; "-" signs ad hoc. Trust anchors for verification come from
    SIGNBRIDGE_ANCHORS or the TrustAnchors setting. Returns the exit code.
    """
    try:
        arguments = parse_arguments(argv)
    except ArgumentError as exc:
        echo(f"signbridge codesign: {exc}", err=True)
        echo(USAGE, err=True)
        return EXIT_USAGE
    if arguments.help:
        echo(USAGE)
        return EXIT_SUCCESS
    if arguments.operation is None or not arguments.paths:
        echo(USAGE, err=True)
        return EXIT_USAGE
    terminal = Terminal(arguments.verbose)
    try:
        if arguments.operation == "sign":
            return _sign(arguments, terminal)
        if arguments.operation == "verify":
            return _verify(arguments, terminal)
        return _display(arguments, terminal)
    except UsageError as exc:
        terminal.error(f"signbridge codesign: {exc}")
        return EXIT_USAGE


# --- signing --------------------------------------------------------------------------------------


def _sign_options(arguments: Arguments) -> CodesignOptions:
    from ..apple.codesig.cms_signing import resolve_timestamp_url
    from ..apple.codesig.options import CodesignOptions, parse_digest_algorithms, parse_flags
    from ..apple.settings import load_tool_settings

    settings = load_tool_settings()
    entitlements = None
    if arguments.entitlements is not None:
        try:
            entitlements = Path(arguments.entitlements).read_bytes()
        except OSError as exc:
            reason = exc.strerror or exc
            raise UsageError(f"{arguments.entitlements}: cannot read entitlement data ({reason})") from None
    if arguments.requirements is not None:
        raise UsageError(
            "-r/--requirements is not supported when signing; the designated requirement is derived"
        )
    digests = None
    if arguments.digest_algorithm:
        digests = parse_digest_algorithms(arguments.digest_algorithm)
    return CodesignOptions(
        identifier=arguments.identifier,
        prefix=arguments.prefix,
        force=arguments.force,
        flags=parse_flags(arguments.options) if arguments.options is not None else 0,
        runtime_version=_runtime_version(arguments.runtime_version) if arguments.runtime_version else None,
        entitlements=entitlements,
        hash_types=digests,
        timestamp_url=resolve_timestamp_url(arguments.timestamp, settings.timestamp_url),
        deep=arguments.deep,
    )


def _identity(arguments: Arguments) -> Identity | None:
    name = arguments.identity or ""
    if name == "-":
        return None
    from ..apple.certificates import Usage
    from ..keychain.selection import select_identity
    from ..keychain.tokens import find_tokens

    tokens = find_tokens([arguments.token]) if arguments.token else None
    return select_identity(name, usage=Usage.CODE, tokens=tokens)


def _sign(arguments: Arguments, terminal: Terminal) -> int:
    from ..apple import codesign as engine
    from ..apple.codesig.options import notarization_warnings
    from ..apple.dmg.detect import looks_like_disk_image
    from ..apple.dmg.sign import sign_disk_image
    from ..apple.macho.parse import MachOError

    try:
        options = _sign_options(arguments)
    except UsageError:
        raise
    except SignbridgeError as exc:
        terminal.error(f"signbridge codesign: {exc}")
        return EXIT_FAILURE
    try:
        identity = _identity(arguments)
    except SignbridgeError as exc:
        terminal.error(str(exc))
        return EXIT_FAILURE
    reporter = CliReporter(terminal)
    status = EXIT_SUCCESS
    for path in arguments.paths:
        try:
            if looks_like_disk_image(path):
                signed = sign_disk_image(path, identity, options, reporter)
            else:
                signed = engine.sign_code(path, identity, options, reporter)
        except FileNotFoundError:
            terminal.error(f"{path}: No such file or directory")
        except (SignbridgeError, MachOError) as exc:
            terminal.error(f"{path}: {exc}")
        else:
            for warning in notarization_warnings(identity, options, executable=not looks_like_disk_image(path)):
                terminal.error(f"{path}: warning: {warning}")
            terminal.note(1, f"{path}: signed {signed.format} [{signed.identifier}]")
            continue
        status = EXIT_FAILURE
        if not arguments.continue_on_error:
            return status
    return status


# --- verification ---------------------------------------------------------------------------------


def anchors_for_verification():  # noqa: ANN201
    from ..apple.settings import load_tool_settings
    from ..apple.trust import anchors_from_environment

    return tuple(anchors_from_environment(load_tool_settings().anchors_value))


def _verify(arguments: Arguments, terminal: Terminal) -> int:
    from ..apple.codesig.requirements.text import load_requirement
    from ..apple.codesig.verdicts import VerifyOptions
    from ..apple.codesig.verification import REQUIREMENT_FAILED, CodeVerificationError
    from ..apple.dmg.detect import looks_like_disk_image
    from ..apple.macho.parse import MachOError
    from ..apple.verify_code import verify_code

    try:
        requirement = load_requirement(arguments.test_requirement) if arguments.test_requirement else None
        anchors = anchors_for_verification()
    except UsageError:
        raise
    except SignbridgeError as exc:
        terminal.error(f"signbridge codesign: {exc}")
        return EXIT_FAILURE
    options = VerifyOptions(
        anchors=anchors,
        strict=arguments.strict,
        deep=arguments.deep,
        check_expiry=arguments.check_expiry,
        requirement=requirement,
        architecture=arguments.architecture,
    )
    status = EXIT_SUCCESS
    for path in arguments.paths:
        try:
            if looks_like_disk_image(path):
                from ..apple.dmg.verify import verify_disk_image

                verdict = verify_disk_image(path, options)
            else:
                verdict = verify_code(path, options)
        except FileNotFoundError:
            terminal.error(f"{path}: No such file or directory")
            status = EXIT_FAILURE
            continue
        except CodeVerificationError as exc:
            terminal.error(f"{path}: {exc.status}")
            for line in exc.lines():
                terminal.error(line)
            status = EXIT_FAILURE
            continue
        except (SignbridgeError, MachOError) as exc:
            terminal.error(f"{path}: {exc}")
            status = EXIT_FAILURE
            continue
        terminal.note(1, f"{path}: valid on disk")
        if verdict.satisfies_designated:
            terminal.note(1, f"{path}: satisfies its Designated Requirement")
        elif terminal.verbose >= 1:
            terminal.error(f"{path}: does not satisfy its designated Requirement")
            status = status or EXIT_NOVERIFY
        if verdict.satisfies_requirement is True:
            terminal.note(1, f"{path}: explicit requirement satisfied")
        elif verdict.satisfies_requirement is False:
            terminal.error(f"test-requirement: {REQUIREMENT_FAILED}")
            status = status or EXIT_NOVERIFY
    return status


# --- display --------------------------------------------------------------------------------------


def _display(arguments: Arguments, terminal: Terminal) -> int:
    from ..apple import display
    from ..apple.codesig.verification import NotSignedError
    from ..apple.dmg.detect import looks_like_disk_image
    from ..apple.macho.parse import MachOError

    status = EXIT_SUCCESS
    for path in arguments.paths:
        try:
            if looks_like_disk_image(path):
                info = display.disk_image_information(path)
            else:
                info = display.signing_information(path, architecture=arguments.architecture)
        except FileNotFoundError:
            terminal.error(f"{path}: No such file or directory")
            status = EXIT_FAILURE
            continue
        except NotSignedError:
            terminal.error(f"{path}: code object is not signed at all")
            status = EXIT_FAILURE
            continue
        except (SignbridgeError, MachOError) as exc:
            terminal.error(f"{path}: {exc}")
            status = EXIT_FAILURE
            continue
        for stream, line in display.display_lines(info, arguments.verbose, nested=arguments.deep):
            echo(line, err=stream == display.STDERR)
        if arguments.requirements is not None:
            _write_requirements(info, arguments.requirements)
        if arguments.entitlements is not None:
            _write_entitlements(info, arguments, terminal)
    return status


def _write_requirements(info: display.SigningInformation, destination: str) -> None:
    from ..apple import display

    designated = display.implicit_designated(info)
    text = "".join(line + "\n" for line in display.requirement_lines(info, designated))
    _write_output(destination, text.encode())


def _write_entitlements(info: display.SigningInformation, arguments: Arguments, terminal: Terminal) -> None:
    from ..apple import display
    from ..apple.codesig.entitlements import entitlements_xml, signature_entitlements

    destination = arguments.entitlements or "-"
    value, xml, der = signature_entitlements(info.signature)
    if destination.startswith(":"):
        terminal.error(DEPRECATED_COLON)
        if xml is not None:
            _write_output(destination[1:], xml)
        return
    if value is None:
        return
    if arguments.der:
        data = der if der is not None else b""
    elif arguments.xml:
        data = xml if xml is not None else entitlements_xml(value)
    else:
        data = display.entitlements_text(value).encode()
    _write_output(destination, data)


def _write_output(destination: str, data: bytes) -> None:
    if destination == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        Path(destination).write_bytes(data)
    except OSError as exc:
        raise UsageError(f"{destination}: {exc.strerror or exc}") from None
