"""The crypto provider's settings (``signbridge start``): what it needs to know, and their checks.

Where each comes from is :mod:`signbridge.config` (command line > environment > config file, with
SignPath's names). The API token never appears in a message, a ``repr`` or
:meth:`ProviderSettings.redacted`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import (
    DEFAULT_API_URL,
    GUID,
    Origin,
    is_loopback_host,
    mask_url_password,
    parse_api_token,
    parse_value,
    read_settings,
    setting_names,
)
from ..errors import ConfigError

_ORGANIZATION_AND_TOKEN = re.compile(rf"({GUID.pattern}):(.+)", re.DOTALL)


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


@dataclass(frozen=True)
class ProviderSettings:
    """Everything ``signbridge start`` needs to know; see :mod:`signbridge.config` for where each comes from."""

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
            "api_url": mask_url_password(self.api_url),
            "organization_id": self.organization_id,
            "api_token": "***" if self.api_token else None,
            "project_slug": self.project_slug,
            "signing_policy_slug": self.signing_policy_slug,
            "http_request_timeout": self.http_request_timeout,
            "service_unavailable_timeout": self.service_unavailable_timeout,
            "http_proxy": mask_url_password(self.http_proxy),
            "log_console_level": self.log_console_level,
            "log_console_output_stream": self.log_console_output_stream,
            "log_file_level": self.log_file_level,
            "log_file_directory": str(self.log_file_directory),
            "cryptoki_do_not_fail_on_read_write_sessions": self.cryptoki_do_not_fail_on_read_write_sessions,
            "include_dummy_x509_certificate_for_gpg_keys": self.include_dummy_x509_certificate_for_gpg_keys,
            "trust_anchors": [str(path) for path in self.trust_anchors],
            "timestamp_url": mask_url_password(self.timestamp_url),
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


_FIELDS = tuple(item.name for item in dataclasses.fields(ProviderSettings) if item.name not in ("config_file", "sources", "warnings"))


def load_settings(
    *, cli: Mapping[str, Any], environ: Mapping[str, str] = os.environ, program_dir: Path | None = None
) -> ProviderSettings:
    """The provider's settings: command line > environment > config file > defaults.

    ``cli`` maps :class:`ProviderSettings` field names (and ``config``) to values; ``None`` means
    "not given", so click's ``ctx.params`` can be passed as it is. ``program_dir`` is where the
    default ``config.json`` is looked for (default: :func:`signbridge.config.default_program_dir`).
    """
    reading = read_settings(_FIELDS, cli=cli, environ=environ, program_dir=program_dir)
    chosen = dict(reading.values)
    origins = dict(reading.origins)
    sources = {name: origin.describe() for name, origin in origins.items()}
    warnings = list(reading.warnings)
    if "log_file_directory" not in chosen:
        chosen["log_file_directory"] = default_log_directory(environ)

    _split_organization_from_token(chosen, origins, sources)
    api_url = chosen.get("api_url", DEFAULT_API_URL)
    if urlsplit(api_url).scheme == "http" and not is_loopback_host(urlsplit(api_url).hostname or ""):
        warnings.append(f"ApiUrl {mask_url_password(api_url)} is not HTTPS: the API token travels unencrypted")
    return ProviderSettings(**chosen, config_file=reading.config_file, sources=sources, warnings=tuple(warnings))


def _split_organization_from_token(chosen: dict[str, Any], origins: dict[str, Origin], sources: dict[str, str]) -> None:
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
        names = setting_names(name)
        missing.append(f'  {names["json"]}: pass {names["flag"]}, set {names["env"]}, or put "{names["json"]}" in {where}')
    if missing:
        raise ConfigError("the provider cannot connect without these settings:\n" + "\n".join(missing))


def parse_pin(pin: str) -> tuple[str, str] | None:
    """A Cryptoki PIN: ``CONFIG`` (use the settings; returns None) or ``$OrganizationId:$ApiToken``."""
    if pin.strip() == "CONFIG":
        return None
    organization, colon, rest = pin.strip().partition(":")
    if not colon or not GUID.fullmatch(organization):
        raise ConfigError("the PIN must be CONFIG or $OrganizationId:$ApiToken (organization id, colon, API token)")
    token = parse_value(parse_api_token, rest, Origin("cli", "the API token in the PIN"))
    if token is None:
        raise ConfigError("the PIN has an organization id but no API token after the colon")
    return organization.lower(), token
