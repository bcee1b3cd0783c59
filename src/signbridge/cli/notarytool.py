"""``signbridge notarytool``: xcrun notarytool's submit, info, wait, log, history and
store-credentials against the Notary API v2, plus an offline ``preflight``."""

from __future__ import annotations

import json
import plistlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..apple.notary.api import NotaryClient, Submission, file_sha256
from ..apple.notary.credentials import ApiKey, resolve_api_key, store_profile
from ..apple.notary.payload import Limits
from ..apple.notary.preflight import Problem, preflight
from ..apple.trust import load_anchors
from ..errors import UsageError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """notarytool's ``--timeout``: a number of seconds, or with ``s``, ``m``, ``h`` or ``d``."""
    match = _DURATION.match(text.lower())
    if not match:
        raise UsageError(f"{text!r} is not a duration; write e.g. 3600, 45m, 2h or 1d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _apple_id_unsupported(context: click.Context, parameter: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise UsageError(
            f"--{parameter.name.replace('_', '-') if parameter.name else 'apple-id'}: Apple ID credentials are not "
            "supported; the Notary API takes an App Store Connect API key (--key, --key-id, --issuer)"
        )


def _credential_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--key", "key", metavar="PATH", help="App Store Connect API key (AuthKey_<ID>.p8)."),
            click.option("--key-id", "key_id", metavar="ID", help="The API key's ID."),
            click.option("--issuer", metavar="UUID", help="The API key's issuer (team) ID."),
            click.option("-p", "--keychain-profile", "profile", metavar="NAME", help="A profile saved by store-credentials."),
            click.option(
                "-f", "--output-format", "output_format", type=click.Choice(["normal", "json", "plist"]),
                default="normal", help="Human-readable output, or JSON or a property list for scripts.",
            ),
            click.option("--apple-id", hidden=True, expose_value=False, callback=_apple_id_unsupported),
            click.option("--password", hidden=True, expose_value=False, callback=_apple_id_unsupported),
            click.option("--team-id", hidden=True, expose_value=False, callback=_apple_id_unsupported),
            click.option("--api-url", hidden=True, envvar="SIGNBRIDGE_NOTARY_API_URL"),
        ]
    ):
        function = option(function)
    return function


class _Output:
    def __init__(self, output_format: str) -> None:
        self.format = output_format
        self.json = output_format in ("json", "plist")  # machine-readable: no human lines

    def human(self, text: str) -> None:
        if not self.json:
            click.echo(text)

    def progress(self, text: str) -> None:
        if not self.json:
            click.echo(text, err=True)

    def document(self, value: dict[str, Any]) -> None:
        if self.format == "plist":
            click.echo(plistlib.dumps(value, sort_keys=True).decode(), nl=False)
        else:
            click.echo(json.dumps(value, sort_keys=True))

    def record(self, message: str, fields: dict[str, Any]) -> None:
        if self.json:
            self.document({**fields, "message": message})
        else:
            click.echo(message)
            for key in sorted(fields):
                click.echo(f"  {key}: {fields[key]}")


def _client(key: str | None, key_id: str | None, issuer: str | None, profile: str | None, api_url: str | None) -> NotaryClient:
    api_key: ApiKey = resolve_api_key(key=key, key_id=key_id, issuer=issuer, profile=profile)
    return NotaryClient(api_key, base_url=api_url)


def _final_exit(submission: Submission) -> None:
    if submission.status != "Accepted":
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def notarytool() -> None:
    """Submit software to Apple's notary service (xcrun notarytool's command line)."""


@notarytool.command("store-credentials")
@click.argument("profile_name")
@click.option("--key", required=True, metavar="PATH")
@click.option("--key-id", "key_id", required=True, metavar="ID")
@click.option("--issuer", required=True, metavar="UUID")
def store_credentials(profile_name: str, key: str, key_id: str, issuer: str) -> None:
    """Save an API key under PROFILE_NAME (a file only you can read) for --keychain-profile."""
    store_profile(profile_name, key, key_id, issuer)
    click.echo(f'Credentials saved to Keychain.\nTo use them, specify `--keychain-profile "{profile_name}"`')


@notarytool.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@_credential_options
@click.option("--wait", is_flag=True, help="Wait until the notary service has processed the submission.")
@click.option("--timeout", metavar="DURATION", help="With --wait: give up after this long (3600, 45m, 2h).")
@click.option("--staple", is_flag=True, help="With --wait: staple the ticket when the submission is accepted.")
@click.option("--no-preflight", is_flag=True, help="Skip the offline pre-flight checks.")
@click.option("--anchors", metavar="PATH", envvar="SIGNBRIDGE_ANCHORS", help="Trust anchors for the pre-flight.")
@click.option("--webhook", metavar="URL", help="Ask the notary service to call this URL when done.")
@click.option("--no-progress", is_flag=True, help="Do not print upload progress.")
def submit(
    path: Path, key: str | None, key_id: str | None, issuer: str | None, profile: str | None, output_format: str,
    api_url: str | None, wait: bool, timeout: str | None, staple: bool, no_preflight: bool, anchors: str | None,
    webhook: str | None, no_progress: bool,
) -> None:
    """Upload PATH (a zip, DMG or package) for notarization."""
    from ..apple.notary.upload import upload

    out = _Output(output_format)
    if staple and not wait:
        raise UsageError("--staple needs --wait")
    seconds = parse_duration(timeout) if timeout else None
    if not no_preflight:
        _preflight_or_exit([path], anchors, out)
    out.human(f"Conducting pre-submission checks for {path.name} and initiating connection to the Apple notary service...")
    with _client(key, key_id, issuer, profile, api_url) as client:
        target = client.create_submission(path.name, file_sha256(path), webhook)
        out.human(f"Submission ID received\n  id: {target.submission_id}")
        report = None if (no_progress or out.json) else _upload_progress()
        upload(path, target, progress=report)
        if report is not None:
            click.echo("", err=True)
        if not wait:
            out.record("Successfully uploaded file", {"id": target.submission_id, "path": str(path)})
            return
        out.human(f"Successfully uploaded file\n  id: {target.submission_id}\n  path: {path}")
        out.human("Waiting for processing to complete.")
        result = client.wait(target.submission_id, timeout=seconds, on_status=_status_printer(out))
        out.record("Processing complete", {"id": result.id, "status": result.status})
    if staple and result.status == "Accepted":
        from ..apple.notary.stapler import staple as staple_path

        staple_path(path, wait=600)  # tickets appear minutes after acceptance
        out.human("The staple and validate action worked!")
    _final_exit(result)


def _upload_progress() -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        share = 100.0 * done / total if total else 100.0
        click.echo(f"\rUpload progress: {share:.2f}% ({_size(done)} of {_size(total)})", nl=False, err=True)

    return report


def _size(count: int) -> str:
    """A size as notarytool shows upload progress: bytes, KB, MB or GB (powers of 1000)."""
    if count < 1000:
        return f"{count} bytes"
    value = float(count)
    for unit in ("KB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _status_printer(out: _Output) -> Callable[[Submission], None]:
    def show(submission: Submission) -> None:
        out.progress(f"Current status: {submission.status}...")

    return show


@notarytool.command()
@click.argument("submission_id")
@_credential_options
def info(submission_id: str, key: str | None, key_id: str | None, issuer: str | None, profile: str | None,
         output_format: str, api_url: str | None) -> None:
    """Show a submission's status."""
    with _client(key, key_id, issuer, profile, api_url) as client:
        submission = client.submission(submission_id)
    _Output(output_format).record("Successfully received submission info", submission.fields())


@notarytool.command("wait")
@click.argument("submission_id")
@_credential_options
@click.option("--timeout", metavar="DURATION", help="Give up after this long (3600, 45m, 2h).")
def wait_command(submission_id: str, key: str | None, key_id: str | None, issuer: str | None, profile: str | None,
                 output_format: str, api_url: str | None, timeout: str | None) -> None:
    """Wait until a submission is processed."""
    out = _Output(output_format)
    seconds = parse_duration(timeout) if timeout else None
    with _client(key, key_id, issuer, profile, api_url) as client:
        result = client.wait(submission_id, timeout=seconds, on_status=_status_printer(out))
    out.record("Processing complete", {"id": result.id, "status": result.status})
    _final_exit(result)


@notarytool.command()
@click.argument("submission_id")
@click.argument("output_path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@_credential_options
def log(submission_id: str, output_path: Path | None, key: str | None, key_id: str | None, issuer: str | None,
        profile: str | None, output_format: str, api_url: str | None) -> None:
    """Fetch a submission's log (to OUTPUT_PATH, or print it)."""
    from ..atomic import write_atomically

    with _client(key, key_id, issuer, profile, api_url) as client:
        content = client.log(submission_id)
    if output_path is None:
        click.echo(content.decode("utf-8", errors="replace"))
        return
    write_atomically(output_path, content, fsync=True, make_parents=True)
    _Output(output_format).record("Successfully downloaded submission log", {"id": submission_id, "location": str(output_path)})


@notarytool.command()
@_credential_options
def history(key: str | None, key_id: str | None, issuer: str | None, profile: str | None, output_format: str,
            api_url: str | None) -> None:
    """List the team's submissions."""
    with _client(key, key_id, issuer, profile, api_url) as client:
        submissions = client.history()
    out = _Output(output_format)
    if out.json:
        out.document({"history": [s.fields() for s in submissions], "message": "Successfully received submission history."})
        return
    click.echo("Successfully received submission history.")
    for submission in submissions:
        click.echo("  " + "-" * 50)
        for name, value in sorted(submission.fields().items()):
            click.echo(f"  {name}: {value}")


def _run_preflight(paths: list[Path], anchors: str | None, limits: Limits | None = None) -> list[Problem]:
    return preflight(paths, tuple(load_anchors(anchors)) if anchors else (), limits)


def _preflight_or_exit(paths: list[Path], anchors: str | None, out: _Output) -> None:
    problems = _run_preflight(paths, anchors)
    if not problems:
        return
    if out.json:
        out.document({"message": "Pre-flight found problems; nothing was uploaded",
                      "problems": [p.as_dict() for p in problems]})
    else:
        for problem in problems:
            click.echo(str(problem), err=True)
        click.echo(f"Pre-flight found {len(problems)} problem(s) the notary service would reject; nothing was "
                   "uploaded (--no-preflight skips this check).", err=True)
    sys.exit(1)


@notarytool.command("preflight")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--anchors", metavar="PATH", envvar="SIGNBRIDGE_ANCHORS",
              help="Certificates Developer ID chains must end at (PEM/DER file or directory).")
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
@click.option("--max-payload-size", type=int, default=Limits.max_bytes, show_default=True, metavar="BYTES",
              help="Stop reading an archive or package payload that expands past this.")
@click.option("--max-entries", type=int, default=Limits.max_entries, show_default=True,
              help="Stop reading an archive or package payload with more entries.")
def preflight_command(paths: tuple[Path, ...], anchors: str | None, as_json: bool, max_payload_size: int,
                      max_entries: int) -> None:
    """Check offline what the notary service would reject in PATHS (apps, packages, zips, Mach-O)."""
    problems = _run_preflight(list(paths), anchors, Limits(max_payload_size, max_entries))
    if as_json:
        click.echo(json.dumps({"paths": [str(p) for p in paths], "ok": not problems,
                               "problems": [p.as_dict() for p in problems]}, indent=2))
    else:
        for problem in problems:
            click.echo(str(problem))
        noun = "problem" if len(problems) == 1 else "problems"
        click.echo(f"{len(problems)} {noun} found" if problems else "No problems found.", err=bool(problems))
    sys.exit(1 if problems else 0)
