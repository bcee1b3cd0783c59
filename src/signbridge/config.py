"""Settings of the crypto provider (``signbridge start``), read the way SignPath's providers read them.

Each setting can come from the command line, the environment or a JSON config file; the command
line wins over the environment, which wins over the file. The file is
``--config``, else ``$SIGNPATH_CONFIG_FILE``, else ``config.json`` beside the installed
``signbridge`` program; only that last one may be absent.

The file uses SignPath's keys, nested (``{"Log": {"Console": {"Level": "info"}}}``) or dotted
(``{"Log.Console.Level": "info"}``), so a SignPath config file works unchanged. Rules:

- ``null`` and empty strings count as "not set" (SignPath's skeleton files leave values empty).
- Relative paths in the file are relative to the file; elsewhere, to the working directory.
- ``CIUserToken`` / ``SIGNPATH_CI_USER_TOKEN`` (renamed in Crypto Providers 4.2.0) and
  ``Timeouts.HttpRequest`` (renamed in 6.0.2) are still read when the new name is not given.
  Settings signbridge cannot use (Windows-only ``TlsClientCertificate``, the retry settings removed
  in 6.0.2) are accepted and reported in :attr:`ProviderSettings.warnings`.
- ``HttpProxy`` comes from the file or ``http_proxy`` (``HTTP_PROXY``), the variable SignPath reads,
  and applies to the service's HTTPS traffic as in SignPath. ``HTTPS_PROXY``/``NO_PROXY`` are not
  settings: when no ``HttpProxy`` is set, httpx itself honours them.
- signbridge's additions: ``TrustAnchors`` (``SIGNBRIDGE_ANCHORS``; files or directories of trusted
  root certificates, for verifying signatures), ``TimestampUrl`` (``SIGNBRIDGE_TIMESTAMP_URL``; the
  TSA that ``--timestamp`` without a URL uses) and ``CaBundle`` (``SIGNBRIDGE_CA_BUNDLE``; extra CA
  certificates for TLS to the service).

The command line is given as a mapping of :class:`ProviderSettings` field names (``api_url``,
``organization_id``, ``api_token``, ...) plus ``config``; messages call them ``--api-url`` and so on.
The API token never appears in a message, a ``repr`` or :meth:`ProviderSettings.redacted`.
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

DEFAULT_API_URL = "https://app.signpath.io/Api"
CONFIG_FILE_NAME = "config.json"
LOG_LEVELS = ("none", "fatal", "error", "warning", "info", "debug", "verbose")
OUTPUT_STREAMS = ("stdout", "stderr")

_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_ORGANIZATION_AND_TOKEN = re.compile(rf"({_GUID.pattern}):(.+)", re.DOTALL)
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def default_log_directory(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> Path:
    """Where the provider's log file goes by default.

    macOS: ``~/Library/Logs/SignBridge`` (beside SignPath's ``~/Library/Logs/SignPathCryptoTokenKit``).
    Elsewhere: ``$XDG_STATE_HOME/signbridge/log``, i.e. ``~/.local/state/signbridge/log``, which is
    what ``platformdirs.user_log_dir("signbridge")`` gives on Linux.
    """
    if platform == "darwin":
        return Path.home() / "Library" / "Logs" / "SignBridge"
    state = environ.get("XDG_STATE_HOME", "")
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "signbridge" / "log"


def default_program_dir() -> Path | None:
    """The directory of the installed ``signbridge`` program (symlinks resolved), if there is one."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name in ("signbridge", "signbridge.exe") and os.path.isfile(argv0):
        return Path(argv0).resolve().parent
    found = shutil.which("signbridge")
    return Path(found).resolve().parent if found else None


@dataclass(frozen=True)
class ProviderSettings:
    """Everything ``signbridge start`` needs to know; see the module docstring for where each comes from."""

    api_url: str = DEFAULT_API_URL
    organization_id: str | None = None
    api_token: str | None = None
    project_slug: str | None = None
    signing_policy_slug: str | None = None
    http_request_timeout: float = 30.0
    service_unavailable_timeout: float = 600.0
    http_proxy: str | None = None
    log_console_level: str = "none"
    log_console_output_stream: str = "stderr"
    log_file_level: str = "info"
    log_file_directory: Path = field(default_factory=default_log_directory)
    cryptoki_do_not_fail_on_read_write_sessions: bool = False
    include_dummy_x509_certificate_for_gpg_keys: bool = False
    trust_anchors: tuple[Path, ...] = ()
    timestamp_url: str | None = None
    ca_bundle: Path | None = None
    config_file: Path | None = None
    #: Field name -> where its value came from ("environment variable SIGNPATH_API_URL", ...).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    #: Things worth logging once logging is configured (ignored keys, an unencrypted ApiUrl, ...).
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data, safe to print or log: no token, no passwords in URLs."""
        return {
            "api_url": _mask_url_password(self.api_url),
            "organization_id": self.organization_id,
            "api_token": "***" if self.api_token else None,
            "project_slug": self.project_slug,
            "signing_policy_slug": self.signing_policy_slug,
            "http_request_timeout": self.http_request_timeout,
            "service_unavailable_timeout": self.service_unavailable_timeout,
            "http_proxy": _mask_url_password(self.http_proxy),
            "log_console_level": self.log_console_level,
            "log_console_output_stream": self.log_console_output_stream,
            "log_file_level": self.log_file_level,
            "log_file_directory": str(self.log_file_directory),
            "cryptoki_do_not_fail_on_read_write_sessions": self.cryptoki_do_not_fail_on_read_write_sessions,
            "include_dummy_x509_certificate_for_gpg_keys": self.include_dummy_x509_certificate_for_gpg_keys,
            "trust_anchors": [str(path) for path in self.trust_anchors],
            "timestamp_url": _mask_url_password(self.timestamp_url),
            "ca_bundle": str(self.ca_bundle) if self.ca_bundle else None,
            "config_file": str(self.config_file) if self.config_file else None,
        }

    def secrets(self) -> tuple[str, ...]:
        """Every value that must never be written anywhere: the token, its PIN form, URL passwords."""
        found = []
        if self.api_token:
            found.append(self.api_token)
            if self.organization_id:
                found.append(f"{self.organization_id}:{self.api_token}")
        for url in (self.api_url, self.http_proxy, self.timestamp_url):
            password = urlsplit(url).password if url else None
            if password:
                found.append(password)
        return tuple(found)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"ProviderSettings({shown})"

    __str__ = __repr__


# ---- parsing single values ---------------------------------------------------------------------


class _Invalid(Exception):
    """A value is wrong; the text completes a sentence that starts with the setting's name."""


class _Ignored:
    def __init__(self, reason: str) -> None:
        self.reason = reason


@dataclass(frozen=True)
class _Origin:
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


Parser = Callable[[Any, _Origin], Any]


def _show(value: Any) -> str:
    text = json.dumps(str(value) if isinstance(value, Path) else value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _text(value: Any, origin: _Origin) -> str | None:
    if value is None:
        return None
    if isinstance(value, Path) and origin.kind == "cli":
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_show(value)}")
    return value.strip() or None


def _url(what: str) -> Parser:
    def parse(value: Any, origin: _Origin) -> str | None:
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
            raise _Invalid(f"must be {what} without a query or fragment, not {_show(_mask_url_password(text))}")
        return text.rstrip("/")

    return parse


def _guid(value: Any, origin: _Origin) -> str | None:
    text = _text(value, origin)
    if text is None:
        return None
    if not _GUID.fullmatch(text):
        raise _Invalid(
            f"must be a GUID like 0a1b2c3d-0000-4000-8000-00000000abcd (the first id in your SignPath URL), "
            f"not {_show(text)}"
        )
    return text.lower()


def _token(value: Any, origin: _Origin) -> str | None:
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


def _slug(value: Any, origin: _Origin) -> str | None:
    text = _text(value, origin)
    if text is not None and "/" in text:
        raise _Invalid(f"must be a single slug without '/', not {_show(text)}; give the project and policy separately")
    return text


def _seconds(*, allow_zero: bool) -> Parser:
    def parse(value: Any, origin: _Origin) -> float | None:
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
    def parse(value: Any, origin: _Origin) -> str | None:
        text = _text(value, origin)
        if text is None:
            return None
        if text.lower() not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}; not {_show(text)}")
        return text.lower()

    return parse


def _bool(value: Any, origin: _Origin) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and origin.from_text:
        if not value.strip():
            return None
        if value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
    raise _Invalid(f"must be true or false, not {_show(value)}")


def _directory(value: Any, origin: _Origin) -> Path | None:
    text = _text(value, origin)
    return origin.path(text) if text is not None else None


def _existing_file(value: Any, origin: _Origin) -> Path | None:
    text = _text(value, origin)
    if text is None:
        return None
    path = origin.path(text)
    if not path.is_file():
        raise _Invalid(f"names {path}, which {'is not a file' if path.exists() else 'does not exist'}")
    return path


def _anchors(value: Any, origin: _Origin) -> tuple[Path, ...] | None:
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


def _proxy(value: Any, origin: _Origin) -> str | None:
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
        raise _Invalid(f"must be host:port or http://host:port, not {_show(_mask_url_password(text))}")
    return url.rstrip("/")


def _ignored(reason: str) -> Parser:
    def parse(value: Any, origin: _Origin) -> _Ignored:
        return _Ignored(reason)

    return parse


# ---- the table of settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    field: str  # ProviderSettings field; "" for keys that are accepted and ignored
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
    _Key("api_token", "ApiToken", ("SIGNPATH_API_TOKEN", "SIGNPATH_CI_USER_TOKEN"), _token, ("CIUserToken",)),
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

_Values = dict[str, tuple[Any, _Origin]]


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


def _parse(parser: Parser, value: Any, origin: _Origin) -> Any:
    try:
        return parser(value, origin)
    except _Invalid as exc:
        raise ConfigError(f"{origin.describe()} {exc}") from None


def _file_values(path: Path, warnings: list[str]) -> _Values:
    flat = _read_file(path)
    parsed = {name: _parse(_LEAVES[name], value, _Origin("file", name, path)) for name, value in flat.items()}
    for name, value in parsed.items():
        if isinstance(value, _Ignored):
            warnings.append(f"{path}: {name} is ignored: {value.reason}")
    values: _Values = {}
    for key in _KEYS:
        for name in (key.json, *key.legacy_json):
            if parsed.get(name) is None:
                continue
            if key.field in values:
                if values[key.field][0] != parsed[name]:
                    warnings.append(f"{path}: {name} is ignored because {key.json} is set")
            else:
                values[key.field] = (parsed[name], _Origin("file", name, path))
    return values


def _env_values(environ: Mapping[str, str], warnings: list[str]) -> _Values:
    values: _Values = {}
    for key in _KEYS:
        for variable in key.env:
            raw = environ.get(variable)
            if raw is None or not raw.strip():
                continue
            origin = _Origin("env", variable)
            value = _parse(key.parse, raw, origin)
            if value is None:
                continue
            if key.field in values:
                if values[key.field][0] != value:
                    warnings.append(f"environment variable {variable} is ignored because {values[key.field][1].name} is set")
            else:
                values[key.field] = (value, origin)
    return values


def _cli_values(cli: Mapping[str, Any]) -> _Values:
    values: _Values = {}
    for key in _KEYS:
        raw = cli.get(key.field)
        if raw is None or raw == ():
            continue
        origin = _Origin("cli", key.flag)
        value = _parse(key.parse, raw, origin)
        if value is not None:
            values[key.field] = (value, origin)
    return values


def _config_file(cli: Mapping[str, Any], environ: Mapping[str, str], program_dir: Path | None) -> Path | None:
    given = cli.get("config")
    if given is not None and str(given).strip():
        path = _Origin("cli", "--config").path(str(given).strip())
        if not path.exists():
            raise ConfigError(f"--config: the config file {path} does not exist")
        return path
    named = environ.get("SIGNPATH_CONFIG_FILE", "").strip()
    if named:
        path = _Origin("env", "SIGNPATH_CONFIG_FILE").path(named)
        if not path.exists():
            raise ConfigError(f"environment variable SIGNPATH_CONFIG_FILE names {path}, which does not exist")
        return path
    directory = program_dir if program_dir is not None else default_program_dir()
    if directory is None:
        return None
    path = Path(os.path.abspath(directory / CONFIG_FILE_NAME))
    return path if path.exists() else None


def load_settings(
    *, cli: Mapping[str, Any], environ: Mapping[str, str] = os.environ, program_dir: Path | None = None
) -> ProviderSettings:
    """The provider's settings: command line > environment > config file > defaults.

    ``cli`` maps :class:`ProviderSettings` field names (and ``config``) to values; ``None`` means
    "not given", so click's ``ctx.params`` can be passed as it is. ``program_dir`` is where the
    default ``config.json`` is looked for (default: :func:`default_program_dir`).
    """
    warnings: list[str] = []
    config_file = _config_file(cli, environ, program_dir)
    file_values = _file_values(config_file, warnings) if config_file is not None else {}
    env_values = _env_values(environ, warnings)
    cli_values = _cli_values(cli)

    chosen: dict[str, Any] = {}
    sources: dict[str, str] = {}
    origins: dict[str, _Origin] = {}
    for key in _KEYS:
        for values in (cli_values, env_values, file_values):
            if key.field in values:
                value, origin = values[key.field]
                chosen[key.field] = value
                origins[key.field] = origin
                sources[key.field] = origin.describe()
                break
    if "log_file_directory" not in chosen:
        chosen["log_file_directory"] = default_log_directory(environ)

    _split_organization_from_token(chosen, origins, sources)
    api_url = chosen.get("api_url", DEFAULT_API_URL)
    if urlsplit(api_url).scheme == "http" and not is_loopback_host(urlsplit(api_url).hostname or ""):
        warnings.append(f"ApiUrl {_mask_url_password(api_url)} is not HTTPS: the API token travels unencrypted")
    return ProviderSettings(**chosen, config_file=config_file, sources=sources, warnings=tuple(warnings))


def _split_organization_from_token(chosen: dict[str, Any], origins: dict[str, _Origin], sources: dict[str, str]) -> None:
    """Accept the Cryptoki PIN form ``$OrganizationId:$ApiToken`` as a token value."""
    token = chosen.get("api_token")
    match = _ORGANIZATION_AND_TOKEN.fullmatch(token) if token else None
    if match is None:
        return
    organization, chosen["api_token"] = match.group(1).lower(), match.group(2)
    given = chosen.get("organization_id")
    if given is None:
        chosen["organization_id"] = organization
        sources["organization_id"] = sources["api_token"]
    elif given != organization:
        raise ConfigError(
            f"{origins['api_token'].describe()} has the form $OrganizationId:$ApiToken with organization "
            f"{organization}, but {origins['organization_id'].describe()} is {given}"
        )


def require_connection_settings(settings: ProviderSettings) -> None:
    """Raise a :class:`ConfigError` that lists every setting the provider cannot connect without."""
    where = str(settings.config_file) if settings.config_file else "a config file (--config or SIGNPATH_CONFIG_FILE)"
    missing = []
    for name in ("organization_id", "api_token"):
        if getattr(settings, name):
            continue
        key = _KEY_BY_FIELD[name]
        missing.append(f'  {key.json}: pass {key.flag}, set {key.env[0]}, or put "{key.json}" in {where}')
    if missing:
        raise ConfigError("the provider cannot connect without these settings:\n" + "\n".join(missing))


def parse_pin(pin: str) -> tuple[str, str] | None:
    """A Cryptoki PIN: ``CONFIG`` (use the settings; returns None) or ``$OrganizationId:$ApiToken``."""
    if pin.strip() == "CONFIG":
        return None
    organization, colon, rest = pin.strip().partition(":")
    if not colon or not _GUID.fullmatch(organization):
        raise ConfigError("the PIN must be CONFIG or $OrganizationId:$ApiToken (organization id, colon, API token)")
    token = _parse(_token, rest, _Origin("cli", "the API token in the PIN"))
    if token is None:
        raise ConfigError("the PIN has an organization id but no API token after the colon")
    return organization.lower(), token


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


def _mask_url_password(url: str | None) -> str | None:
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


__all__ = [
    "CONFIG_FILE_NAME",
    "DEFAULT_API_URL",
    "LOG_LEVELS",
    "OUTPUT_STREAMS",
    "ProviderSettings",
    "default_log_directory",
    "default_program_dir",
    "load_settings",
    "parse_pin",
    "require_connection_settings",
    "setting_names",
]
