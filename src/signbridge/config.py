"""SignPath's settings sources, shared by the crypto provider and the Apple tools.

Each setting can come from the command line, the environment or a JSON config file; the command
line wins over the environment, which wins over the file. The file is
``--config``, else ``$SIGNPATH_CONFIG_FILE``, else ``config.json`` beside the installed
``signbridge`` program; only that last one may be absent. This module holds where the file is,
the table of keys with their environment variables, how each value is parsed, and
:func:`read_settings`, which reads the chosen ones; the provider's settings are
:mod:`signbridge.provider.settings`, the Apple tools' :mod:`signbridge.apple.settings`.

The file uses SignPath's keys, nested (``{"Log": {"Console": {"Level": "info"}}}``) or dotted
(``{"Log.Console.Level": "info"}``), so a SignPath config file works unchanged. Rules:

- ``null`` and empty strings count as "not set" (SignPath's skeleton files leave values empty).
- Relative paths in the file are relative to the file; elsewhere, to the working directory.
- ``CIUserToken`` / ``SIGNPATH_CI_USER_TOKEN`` (renamed in Crypto Providers 4.2.0) and
  ``Timeouts.HttpRequest`` (renamed in 6.0.2) are still read when the new name is not given.
  Settings signbridge cannot use (Windows-only ``TlsClientCertificate``, the retry settings removed
  in 6.0.2) are accepted and reported as warnings.
- ``HttpProxy`` comes from the file or ``http_proxy`` (``HTTP_PROXY``), the variable SignPath reads,
  and applies to the service's HTTPS traffic as in SignPath. ``HTTPS_PROXY``/``NO_PROXY`` are not
  settings: when no ``HttpProxy`` is set, httpx itself honours them.
- signbridge's additions: ``TrustAnchors`` (``SIGNBRIDGE_ANCHORS``; files or directories of trusted
  root certificates, for verifying signatures), ``TimestampUrl`` (``SIGNBRIDGE_TIMESTAMP_URL``; the
  TSA that ``--timestamp`` without a URL uses) and ``CaBundle`` (``SIGNBRIDGE_CA_BUNDLE``; extra CA
  certificates for TLS to the service).

The command line is given as a mapping of field names (``api_url``, ``organization_id``,
``api_token``, ...) plus ``config``; messages call them ``--api-url`` and so on. Only the values
of the fields a reader asks for are parsed, so a bad value of another setting never stops it; the
file itself (its JSON, its keys) is always checked.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

DEFAULT_API_URL = "https://app.signpath.io/Api"
CONFIG_FILE_NAME = "config.json"
LOG_LEVELS = ("none", "fatal", "error", "warning", "info", "debug", "verbose")
OUTPUT_STREAMS = ("stdout", "stderr")

GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def default_program_dir() -> Path | None:
    """The directory of the installed ``signbridge`` program (symlinks resolved), if there is one."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name in ("signbridge", "signbridge.exe") and os.path.isfile(argv0):
        return Path(argv0).resolve().parent
    found = shutil.which("signbridge")
    return Path(found).resolve().parent if found else None



# ---- parsing single values ---------------------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong; the text completes a sentence that starts with the setting's name."""


class _Ignored:
    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True)
class Origin:
    kind: str  # "file", "env" or "cli"
    name: str  # JSON key, variable or flag
    file: Path | None = None

    def describe(self) -> str:
        if self.kind == "file":
            return f"{self.file}: {self.name}"
        if self.kind == "env":
            return f"environment variable {self.name}"
        return self.name

    @property
    def from_text(self) -> bool:
        """Environment and command-line values arrive as strings; JSON values carry their own type."""
        return self.kind != "file"

    def path(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = (self.file.parent if self.file is not None else Path.cwd()) / path
        return Path(os.path.normpath(path))


Parser = Callable[[Any, Origin], Any]


def _show(value: Any) -> str:
    text = json.dumps(str(value) if isinstance(value, Path) else value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: Any, origin: Origin) -> str | None:
    if value is None:
        return None
    if isinstance(value, Path) and origin.kind == "cli":
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_show(value)}")
    return value.strip() or None


def _url(what: str) -> Parser:
    def parse(value: Any, origin: Origin) -> str | None:
        text = _text(value, origin)
        if text is None:
            return None
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise _Invalid(f"must be {what} starting with https:// or http://, not {_show(text)}")
        if parts.query or parts.fragment:
            raise _Invalid(f"must be {what} without a query or fragment, not {_show(mask_url_password(text))}")
        return text.rstrip("/")

    return parse


def _guid(value: Any, origin: Origin) -> str | None:
    text = _text(value, origin)
    if text is None:
        return None
    if not GUID.fullmatch(text):
        raise _Invalid(
            f"must be a GUID like 0a1b2c3d-0000-4000-8000-00000000abcd (the first id in your SignPath URL), "
            f"not {_show(text)}"
        )
    return text.lower()


def parse_api_token(value: Any, origin: Origin) -> str | None:
    # Messages here never include the value.
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Invalid("must be a string")
    text = value.strip()
    if not text:
        return None
    prefix = text.split(":", 1)[0].lower()
    if prefix in ("encrypted", "registry"):
        raise _Invalid(
            f'is a DPAPI-encrypted token ("{prefix}:..."), which only Windows can decrypt; '
            "give the plain token instead (for example in SIGNPATH_API_TOKEN from your CI's secret store)"
        )
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise _Invalid("contains spaces or control characters; copy the token again (without a 'Bearer ' prefix)")
    return text


def _slug(value: Any, origin: Origin) -> str | None:
    text = _text(value, origin)
    if text is not None and "/" in text:
        raise _Invalid(f"must be a single slug without '/', not {_show(text)}; give the project and policy separately")
    return text


def _seconds(*, allow_zero: bool) -> Parser:
    def parse(value: Any, origin: Origin) -> float | None:
        if value is None or (origin.from_text and isinstance(value, str) and not value.strip()):
            return None
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and origin.from_text:
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is None:
            hint = " (write the number without quotes)" if isinstance(value, str) and _is_number(value) else ""
            raise _Invalid(f"must be a number of seconds, not {_show(value)}{hint}")
        if not math.isfinite(number):
            raise _Invalid(f"must be a finite number of seconds, not {_show(value)}")
        if number < 0:
            raise _Invalid(f"must not be negative (got {number:g})")
        if number == 0 and not allow_zero:
            raise _Invalid("must be more than 0 seconds")
        return number

    return parse


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _choice(choices: Sequence[str]) -> Parser:
    def parse(value: Any, origin: Origin) -> str | None:
        text = _text(value, origin)
        if text is None:
            return None
        if text.lower() not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}; not {_show(text)}")
        return text.lower()

    return parse


def _bool(value: Any, origin: Origin) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and origin.from_text:
        if not value.strip():
            return None
        if value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
    raise _Invalid(f"must be true or false, not {_show(value)}")


def _directory(value: Any, origin: Origin) -> Path | None:
    text = _text(value, origin)
    return origin.path(text) if text is not None else None


def _existing_file(value: Any, origin: Origin) -> Path | None:
    text = _text(value, origin)
    if text is None:
        return None
    path = origin.path(text)
    if not path.is_file():
        raise _Invalid(f"names {path}, which {'is not a file' if path.exists() else 'does not exist'}")
    return path


def _anchors(value: Any, origin: Origin) -> tuple[Path, ...] | None:
    if value is None:
        return None
    if origin.from_text and isinstance(value, str):
        items: list[Any] = [item for item in value.split(os.pathsep) if item.strip()]
    elif isinstance(value, str | Path):
        items = [value]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise _Invalid(f"must be a path or a list of paths, not {_show(value)}")
    paths = []
    for item in items:
        text = _text(item, origin)
        if text is None:
            continue
        path = origin.path(text)
        if not path.exists():
            raise _Invalid(f"names {path}, which does not exist")
        paths.append(path)
    return tuple(paths) or None


def _proxy(value: Any, origin: Origin) -> str | None:
    text = _text(value, origin)
    if text is None:
        return None
    url = text if "://" in text else f"http://{text}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise _Invalid(f"must be host:port or http://host:port, not {_show(mask_url_password(text))}")
    return url.rstrip("/")


def _ignored(reason: str) -> Parser:
    def parse(value: Any, origin: Origin) -> _Ignored:
        return _Ignored(reason)

    return parse


# ---- the table of settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    field: str  # the settings field (ProviderSettings, ToolSettings); "" for keys that are accepted and ignored
    json: str  # dotted JSON key
    env: tuple[str, ...]
    parse: Parser
    legacy_json: tuple[str, ...] = ()  # older names, read when the current one is absent

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


_KEYS = (
    _Key("api_url", "ApiUrl", ("SIGNPATH_API_URL",), _url("the service's API URL")),
    _Key("organization_id", "OrganizationId", ("SIGNPATH_ORGANIZATION_ID",), _guid),
    _Key("api_token", "ApiToken", ("SIGNPATH_API_TOKEN", "SIGNPATH_CI_USER_TOKEN"), parse_api_token, ("CIUserToken",)),
    _Key("project_slug", "ProjectSlug", ("SIGNPATH_PROJECT_SLUG",), _slug),
    _Key("signing_policy_slug", "SigningPolicySlug", ("SIGNPATH_SIGNING_POLICY_SLUG",), _slug),
    _Key(
        "http_request_timeout",
        "HttpRequestTimeoutInSeconds",
        ("SIGNPATH_HTTP_REQUEST_TIMEOUT_IN_SECONDS",),
        _seconds(allow_zero=False),
        ("Timeouts.HttpRequest",),
    ),
    _Key(
        "service_unavailable_timeout",
        "ServiceUnavailableTimeoutInSeconds",
        ("SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS",),
        _seconds(allow_zero=True),
    ),
    _Key("http_proxy", "HttpProxy", ("http_proxy", "HTTP_PROXY"), _proxy),
    _Key("log_console_level", "Log.Console.Level", ("SIGNPATH_LOG_CONSOLE_LEVEL",), _choice(LOG_LEVELS)),
    _Key(
        "log_console_output_stream",
        "Log.Console.OutputStream",
        ("SIGNPATH_LOG_CONSOLE_OUTPUT_STREAM",),
        _choice(OUTPUT_STREAMS),
    ),
    _Key("log_file_level", "Log.File.Level", ("SIGNPATH_LOG_FILE_LEVEL",), _choice(LOG_LEVELS)),
    _Key("log_file_directory", "Log.File.Directory", ("SIGNPATH_LOG_FILE_DIRECTORY",), _directory),
    _Key(
        "cryptoki_do_not_fail_on_read_write_sessions",
        "Cryptoki.DoNotFailOnReadWriteSessions",
        ("SIGNPATH_CRYPTOKI_DO_NOT_FAIL_ON_READ_WRITE_SESSIONS",),
        _bool,
    ),
    _Key(
        "include_dummy_x509_certificate_for_gpg_keys",
        "IncludeDummyX509CertificateForGpgKeys",
        ("SIGNPATH_INCLUDE_DUMMY_X509CERTIFICATE_FOR_GPG_KEYS",),
        _bool,
    ),
    _Key("trust_anchors", "TrustAnchors", ("SIGNBRIDGE_ANCHORS",), _anchors),
    _Key("timestamp_url", "TimestampUrl", ("SIGNBRIDGE_TIMESTAMP_URL",), _url("a timestamp authority URL")),
    _Key("ca_bundle", "CaBundle", ("SIGNBRIDGE_CA_BUNDLE",), _existing_file),
)

_IGNORED_KEYS = {
    "TlsClientCertificate": "it names a client certificate in the Windows certificate store",
    "Timeouts.FirstRetryDelay": "SignPath replaced it with ServiceUnavailableTimeoutInSeconds in 6.0.2",
    "Timeouts.RetryCount": "SignPath replaced it with ServiceUnavailableTimeoutInSeconds in 6.0.2",
    "Timeouts.ServiceUnavailable": "SignPath replaced it with ServiceUnavailableTimeoutInSeconds",
}
_KEY_BY_FIELD = {key.field: key for key in _KEYS}
_LEAVES: dict[str, Parser] = {key.json: key.parse for key in _KEYS}
_LEAVES.update({name: key.parse for key in _KEYS for name in key.legacy_json})
_LEAVES.update({name: _ignored(reason) for name, reason in _IGNORED_KEYS.items()})
_SECTIONS = {".".join(name.split(".")[:i]) for name in _LEAVES for i in range(1, name.count(".") + 1)}


# ---- reading the sources -----------------------------------------------------------------------

_Values = dict[str, tuple[Any, Origin]]


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except _DuplicateKey as exc:
        raise ConfigError(f'{path}: key "{exc.args[0]}" appears twice in the same object') from None
    if not isinstance(document, dict):
        kind = {list: "an array", str: "a string"}.get(type(document), "a single value")
        raise ConfigError(f"{path}: the config file must hold a JSON object ({{...}}), not {kind}")
    flat: dict[str, Any] = {}
    _flatten(document, "", path, flat)
    return flat


def _flatten(obj: dict[str, Any], prefix: str, path: Path, out: dict[str, Any]) -> None:
    for key, value in obj.items():
        name = prefix + key
        if name in _LEAVES:
            if name in out:
                raise ConfigError(f"{path}: {name} is given twice (once nested, once with dots)")
            out[name] = value
        elif name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f'{path}: {name} must be an object like {{"{_first_child(name)}": ...}}, not {_show(value)}')
            _flatten(value, name + ".", path, out)
        else:
            raise ConfigError(f'{path}: unknown key "{name}"{_suggestion(name)}')


def _first_child(section: str) -> str:
    return next(name for name in _LEAVES if name.startswith(section + ".")).removeprefix(section + ".").split(".")[0]


def _suggestion(name: str) -> str:
    known = sorted({*_LEAVES, *_SECTIONS})
    for candidate in known:
        if candidate.lower() == name.lower():
            return f"; did you mean {candidate}?"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    top = sorted({key.json.split(".")[0] for key in _KEYS}, key=str.lower)
    return f" (known keys: {', '.join(top)})"


def parse_value(parser: Parser, value: Any, origin: Origin) -> Any:
    """``parser``'s value; a value it rejects is a :class:`ConfigError` naming where it came from."""
    try:
        return parser(value, origin)
    except _Invalid as exc:
        raise ConfigError(f"{origin.describe()} {exc}") from None


def _file_values(path: Path, keys: Sequence[_Key], warnings: list[str]) -> _Values:
    flat = _read_file(path)
    wanted = {*_IGNORED_KEYS, *(name for key in keys for name in (key.json, *key.legacy_json))}
    parsed = {
        name: parse_value(_LEAVES[name], value, Origin("file", name, path))
        for name, value in flat.items()
        if name in wanted
    }
    for name, value in parsed.items():
        if isinstance(value, _Ignored):
            warnings.append(f"{path}: {name} is ignored: {value.reason}")
    values: _Values = {}
    for key in keys:
        for name in (key.json, *key.legacy_json):
            if parsed.get(name) is None:
                continue
            if key.field in values:
                if values[key.field][0] != parsed[name]:
                    warnings.append(f"{path}: {name} is ignored because {key.json} is set")
            else:
                values[key.field] = (parsed[name], Origin("file", name, path))
    return values


def _env_values(environ: Mapping[str, str], keys: Sequence[_Key], warnings: list[str]) -> _Values:
    values: _Values = {}
    for key in keys:
        for variable in key.env:
            raw = environ.get(variable)
            if raw is None or not raw.strip():
                continue
            origin = Origin("env", variable)
            value = parse_value(key.parse, raw, origin)
            if value is None:
                continue
            if key.field in values:
                if values[key.field][0] != value:
                    warnings.append(f"environment variable {variable} is ignored because {values[key.field][1].name} is set")
            else:
                values[key.field] = (value, origin)
    return values


def _cli_values(cli: Mapping[str, Any], keys: Sequence[_Key]) -> _Values:
    values: _Values = {}
    for key in keys:
        raw = cli.get(key.field)
        if raw is None or raw == ():
            continue
        origin = Origin("cli", key.flag)
        value = parse_value(key.parse, raw, origin)
        if value is not None:
            values[key.field] = (value, origin)
    return values


def _config_file(cli: Mapping[str, Any], environ: Mapping[str, str], program_dir: Path | None) -> Path | None:
    given = cli.get("config")
    if given is not None and str(given).strip():
        path = Origin("cli", "--config").path(str(given).strip())
        if not path.exists():
            raise ConfigError(f"--config: the config file {path} does not exist")
        return path
    named = environ.get("SIGNPATH_CONFIG_FILE", "").strip()
    if named:
        path = Origin("env", "SIGNPATH_CONFIG_FILE").path(named)
        if not path.exists():
            raise ConfigError(f"environment variable SIGNPATH_CONFIG_FILE names {path}, which does not exist")
        return path
    directory = program_dir if program_dir is not None else default_program_dir()
    if directory is None:
        return None
    path = Path(os.path.abspath(directory / CONFIG_FILE_NAME))
    return path if path.exists() else None


@dataclass(frozen=True)
class Reading:
    """The values :func:`read_settings` chose, each with where it came from."""

    values: dict[str, Any]
    origins: dict[str, Origin]
    config_file: Path | None
    warnings: tuple[str, ...]


def read_settings(
    fields: Collection[str],
    *,
    cli: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    program_dir: Path | None = None,
) -> Reading:
    """The values of ``fields``: command line > environment > config file; a field given nowhere is absent.

    ``cli`` maps field names (and ``config``) to values; ``None`` means "not given", so click's
    ``ctx.params`` can be passed as it is. ``program_dir`` is where the default ``config.json`` is
    looked for (default: :func:`default_program_dir`).
    """
    keys = [key for key in _KEYS if key.field in fields]
    warnings: list[str] = []
    config_file = _config_file(cli, environ, program_dir)
    file_values = _file_values(config_file, keys, warnings) if config_file is not None else {}
    env_values = _env_values(environ, keys, warnings)
    cli_values = _cli_values(cli, keys)
    values: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    for key in keys:
        for source in (cli_values, env_values, file_values):
            if key.field in source:
                values[key.field], origins[key.field] = source[key.field]
                break
    return Reading(values, origins, config_file, tuple(warnings))


def setting_names(field_name: str) -> dict[str, str]:
    """Where a setting can be given: ``{"flag": "--api-url", "env": "SIGNPATH_API_URL", "json": "ApiUrl"}``."""
    key = _KEY_BY_FIELD[field_name]
    return {"flag": key.flag, "env": key.env[0], "json": key.json}



def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def mask_url_password(url: str | None) -> str | None:
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))

