"""The service's logs as JSON lines (``server run --log-format json``): one object per line with
the time, level, logger, message and the event's own fields. Nothing that looks like a credential
(a bearer token, a PIN, a password in a URL) survives into a line."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from typing import Any

ACCESS_LOGGER = "signbridge.access"
AUDIT_LOGGER = "signbridge.audit"

_CREDENTIALS = re.compile(
    r"(?i)(bearer\s+)[^\s\"',;]+|((?:pin-value|pin|password|apitoken|api_token|token)[\"']?\s*[=:]\s*[\"']?)[^\s\"',;&]+"
    r"|(://[^/\s:@]+:)[^@/\s]+(@)"
)


def redact_credentials(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(1) + "***"
        if match.group(2):
            return match.group(2) + "***"
        return match.group(3) + "***" + match.group(4)

    return _CREDENTIALS.sub(replace, text)


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_credentials(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = redact_credentials(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False, default=str)


def uvicorn_log_config(json_lines: bool, level: str) -> dict[str, Any]:
    """A logging configuration for uvicorn (it applies it in every worker process)."""
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonLinesFormatter"} if json_lines
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    upper = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": upper, "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": upper, "propagate": False},
            "signbridge": {"handlers": ["default"], "level": upper, "propagate": False},
            ACCESS_LOGGER: {"handlers": ["default"], "level": "INFO", "propagate": False},
            AUDIT_LOGGER: {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }
