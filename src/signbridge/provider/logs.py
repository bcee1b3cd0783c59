"""Logging of the crypto provider, shaped like SignPath's.

Two outputs, each with its own level (``none``, ``fatal``, ``error``, ``warning``, ``info``,
``debug``, ``verbose``; ``none`` turns the output off):

- the console (``Log.Console.Level``, default ``none``) on stderr or stdout;
- a file, ``signbridge-provider.log`` in ``Log.File.Directory`` (default ``info``), rotated above
  10 MB with five old copies kept (``signbridge-provider.log.1`` ... ``.5``), as SignPath does.
  The directory is created private (0700) and the file is created 0600.

Secrets never reach either output: every handler carries a :class:`RedactingFilter` that replaces
each registered secret (:func:`register_secret`; :func:`configure_logging` registers the API token,
its ``$OrganizationId:$ApiToken`` form and URL passwords) with ``***`` in the message, its
arguments, exception tracebacks and stack traces.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from ..errors import ConfigError
from .settings import ProviderSettings

VERBOSE = 5
logging.addLevelName(VERBOSE, "VERBOSE")

LEVELS = {
    "fatal": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "verbose": VERBOSE,
}
LOG_FILE_NAME = "signbridge-provider.log"
MAX_LOG_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5

_FILE_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s [%(process)d] %(name)s: %(message)s"
_CONSOLE_FORMAT = "%(levelname)s %(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
_MARK = "_signbridge_handler"

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Never let ``value`` (nor its URL-encoded form) appear in a log line again. Empty values are ignored."""
    if not value:
        return
    with _secrets_lock:
        _secrets.add(value)
        _secrets.add(quote(value, safe=""))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by ``***`` (longest secrets first)."""
    with _secrets_lock:
        ordered = sorted(_secrets, key=len, reverse=True)
    for secret in ordered:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    """Rewrites a record so that no registered secret survives: message, arguments, traceback, stack.

    The record is changed in place (its message is formatted once and its arguments dropped), so
    every handler that sees it afterwards sees the redacted text.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message)
        record.args = ()
        if record.exc_info:
            record.exc_text = self._formatter.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class _RedactingFormatter(logging.Formatter):
    """A last line of defence for text a filter cannot see (fields added through ``extra``)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Creates the log file, and each file after a rotation, readable by its owner only."""

    def _open(self) -> IO[Any]:
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(descriptor, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115


def rotating_file_handler(
    directory: Path,
    *,
    file_name: str = LOG_FILE_NAME,
    max_bytes: int = MAX_LOG_BYTES,
    backup_count: int = LOG_BACKUPS,
) -> logging.handlers.RotatingFileHandler:
    """The provider's log file handler: ``directory`` is created 0700 if missing; the file is opened now."""
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o700)
        handler = _PrivateRotatingFileHandler(
            directory / file_name, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot write the log file in {directory} (Log.File.Directory, SIGNPATH_LOG_FILE_DIRECTORY): "
            f"{exc.strerror or exc}"
        ) from None
    return handler


def configure_logging(settings: ProviderSettings, *, name: str = "signbridge") -> logging.Logger:
    """Point the ``name`` logger (and so ``signbridge.*``) at the outputs ``settings`` asks for.

    Calling it again replaces the handlers it installed before. The logger stops propagating to
    the root logger, so each line is written once, by these handlers only.
    """
    for secret in settings.secrets():
        register_secret(secret)

    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if getattr(h, _MARK, False)]:
        logger.removeHandler(handler)
        handler.close()

    handlers: list[logging.Handler] = []
    if settings.log_console_level != "none":
        stream = sys.stdout if settings.log_console_output_stream == "stdout" else sys.stderr
        console = logging.StreamHandler(stream)
        console.setLevel(LEVELS[settings.log_console_level])
        console.setFormatter(_RedactingFormatter(_CONSOLE_FORMAT))
        handlers.append(console)
    if settings.log_file_level != "none":
        file = rotating_file_handler(settings.log_file_directory)
        file.setLevel(LEVELS[settings.log_file_level])
        file.setFormatter(_RedactingFormatter(_FILE_FORMAT, _DATE_FORMAT))
        handlers.append(file)

    for handler in handlers:
        setattr(handler, _MARK, True)
        handler.addFilter(RedactingFilter())
        logger.addHandler(handler)
    logger.setLevel(min((h.level for h in handlers), default=logging.CRITICAL + 1))
    logger.propagate = False
    return logger


def log_file_path(settings: ProviderSettings) -> Path | None:
    """Where :func:`configure_logging` writes, or None when file logging is off."""
    return None if settings.log_file_level == "none" else settings.log_file_directory / LOG_FILE_NAME


__all__ = [
    "LEVELS",
    "LOG_BACKUPS",
    "LOG_FILE_NAME",
    "MAX_LOG_BYTES",
    "VERBOSE",
    "RedactingFilter",
    "configure_logging",
    "log_file_path",
    "redact",
    "register_secret",
    "rotating_file_handler",
]
