"""Provider logging: levels, outputs, rotation, and secrets that never reach a log line."""

from __future__ import annotations

import io
import itertools
import logging
import logging.handlers
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signbridge.errors import ConfigError
from signbridge.provider.logs import (
    LOG_FILE_NAME,
    VERBOSE,
    RedactingFilter,
    configure_logging,
    log_file_path,
    redact,
    register_secret,
    rotating_file_handler,
)
from signbridge.provider.settings import ProviderSettings, load_settings

ORG = "0a1b2c3d-0000-4000-8000-00000000abcd"
TOKEN = "Zk9/t0ken+With/Slashes+AndPlus0000000000000="
_names = itertools.count()


@pytest.fixture
def logger_name() -> Iterator[str]:
    """A logger of its own for each test; its handlers are closed afterwards."""
    name = f"signbridge.logtest{next(_names)}"
    yield name
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def settings(tmp_path: Path, **overrides: Any) -> ProviderSettings:
    values: dict[str, Any] = {"organization_id": ORG, "api_token": TOKEN, "log_file_directory": tmp_path / "logs"}
    values.update(overrides)
    return ProviderSettings(**values)


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "logs" / LOG_FILE_NAME).read_text(encoding="utf-8")


def test_file_handler_rotates_at_10_mb_keeping_five(tmp_path: Path, logger_name: str) -> None:
    logger = configure_logging(settings(tmp_path), name=logger_name)
    (handler,) = logger.handlers
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == 10 * 1024 * 1024
    assert handler.backupCount == 5
    assert Path(handler.baseFilename) == tmp_path / "logs" / "signbridge-provider.log"
    assert log_file_path(settings(tmp_path)) == Path(handler.baseFilename)
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(handler.baseFilename).stat().st_mode) == 0o600


def test_real_rotation_keeps_five_old_files(tmp_path: Path, logger_name: str) -> None:
    handler = rotating_file_handler(tmp_path / "deep" / "logs", max_bytes=1000)
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for number in range(200):
        logger.info("line %03d %s", number, "x" * 80)  # 89 bytes per line: 11 lines per file
    handler.close()
    directory = tmp_path / "deep" / "logs"
    names = sorted(path.name for path in directory.iterdir())
    assert names == [LOG_FILE_NAME] + [f"{LOG_FILE_NAME}.{n}" for n in range(1, 6)]
    for path in directory.iterdir():
        assert path.stat().st_size <= 1000
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "line 199 " in (directory / LOG_FILE_NAME).read_text()
    older = (directory / f"{LOG_FILE_NAME}.1").read_text().splitlines()
    newest = (directory / LOG_FILE_NAME).read_text().splitlines()
    assert int(older[-1].split()[1]) + 1 == int(newest[0].split()[1])
    assert "line 000 " not in "".join(path.read_text() for path in directory.iterdir())


def test_secrets_are_redacted_in_file_and_console(
    tmp_path: Path, logger_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = configure_logging(settings(tmp_path, log_console_level="debug"), name=logger_name)
    logger.info("Authorization: Bearer %s", TOKEN)
    logger.info("pin %s accepted", f"{ORG}:{TOKEN}")
    logger.info("url-encoded: token=%s", TOKEN.replace("/", "%2F").replace("+", "%2B").replace("=", "%3D"))
    logger.warning({"token": TOKEN})
    try:
        raise RuntimeError(f"the service rejected token {TOKEN}")
    except RuntimeError:
        logger.exception("signing failed for %s", "app/release")
    logger.warning("where %s", TOKEN, stack_info=True)

    for output in (log_text(tmp_path), capsys.readouterr().err):
        assert TOKEN not in output
        assert "%2F" not in output
        assert "Authorization: Bearer ***" in output
        assert "pin *** accepted" in output
        assert "url-encoded: token=***" in output
        assert "{'token': '***'}" in output
        assert "signing failed for app/release\nTraceback (most recent call last):" in output
        assert "RuntimeError: the service rejected token ***" in output
        assert "Stack (most recent call last):" in output


def test_registered_pin_is_redacted_on_any_handler(logger_name: str) -> None:
    pin = "PIN-5c1e0b77"
    register_secret(pin)
    register_secret("")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        raise ValueError(f"C_Login with {pin} failed")
    except ValueError:
        logger.error("login as %s with %r", "user", pin, exc_info=True)
    text = stream.getvalue()
    assert pin not in text
    assert "login as user with '***'" in text
    assert "ValueError: C_Login with *** failed" in text
    assert redact(f"x{pin}y") == "x***y"


def test_level_none_writes_nothing_to_the_console(
    tmp_path: Path, logger_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    logger = configure_logging(settings(tmp_path, log_console_level="none"), name=logger_name)
    logger.critical("only in the file")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert "CRITICAL" in log_text(tmp_path) and "only in the file" in log_text(tmp_path)


def test_both_outputs_off(tmp_path: Path, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    logger = configure_logging(settings(tmp_path, log_file_level="none"), name=logger_name)
    logger.critical("nowhere")
    assert logger.handlers == []
    assert not (tmp_path / "logs").exists()
    assert log_file_path(settings(tmp_path, log_file_level="none")) is None
    assert capsys.readouterr() == ("", "")


def test_console_stream_choice(tmp_path: Path, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    logger = configure_logging(
        settings(tmp_path, log_console_level="info", log_console_output_stream="stdout", log_file_level="none"),
        name=logger_name,
    )
    logger.info("to stdout")
    captured = capsys.readouterr()
    assert captured.out == f"INFO {logger_name}: to stdout\n"
    assert captured.err == ""
    logger = configure_logging(settings(tmp_path, log_console_level="info", log_file_level="none"), name=logger_name)
    logger.info("to stderr")
    assert capsys.readouterr() == ("", f"INFO {logger_name}: to stderr\n")


def test_verbose_is_below_debug(tmp_path: Path, logger_name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert VERBOSE < logging.DEBUG
    assert logging.getLevelName(VERBOSE) == "VERBOSE"
    logger = configure_logging(settings(tmp_path, log_console_level="verbose", log_file_level="debug"), name=logger_name)
    logger.log(VERBOSE, "wire bytes")
    logger.debug("a debug line")
    err = capsys.readouterr().err
    assert f"VERBOSE {logger_name}: wire bytes" in err and "a debug line" in err
    assert "wire bytes" not in log_text(tmp_path) and "a debug line" in log_text(tmp_path)


@pytest.mark.parametrize(
    ("level", "shown"),
    [("fatal", {"critical"}), ("error", {"critical", "error"}), ("warning", {"critical", "error", "warning"}),
     ("info", {"critical", "error", "warning", "info"})],
)
def test_levels_filter(tmp_path: Path, logger_name: str, level: str, shown: set[str]) -> None:
    logger = configure_logging(settings(tmp_path, log_file_level=level), name=logger_name)
    for name in ("critical", "error", "warning", "info", "debug"):
        getattr(logger, name)(f"message-{name}")
    text = log_text(tmp_path)
    assert {name for name in ("critical", "error", "warning", "info", "debug") if f"message-{name}" in text} == shown


def test_configuring_twice_does_not_duplicate(
    tmp_path: Path, logger_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = logging.NullHandler()
    logging.getLogger(logger_name).addHandler(foreign)
    for _ in range(3):
        logger = configure_logging(settings(tmp_path, log_console_level="info"), name=logger_name)
    assert len(logger.handlers) == 3 and foreign in logger.handlers
    logger.info("once")
    assert log_text(tmp_path).count("once") == 1
    assert capsys.readouterr().err.count("once") == 1


def test_children_of_the_configured_logger_are_written(tmp_path: Path, logger_name: str) -> None:
    configure_logging(settings(tmp_path), name=logger_name)
    logging.getLogger(f"{logger_name}.pkcs11").warning("C_Sign for %s", TOKEN)
    assert "WARNING [" in log_text(tmp_path) and f"{logger_name}.pkcs11: C_Sign for ***" in log_text(tmp_path)


def test_unwritable_log_directory_is_a_config_error(tmp_path: Path, logger_name: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as caught:
        configure_logging(settings(tmp_path, log_file_directory=blocker / "logs"), name=logger_name)
    assert str(caught.value).startswith(f"cannot write the log file in {blocker / 'logs'} (Log.File.Directory")


def test_settings_from_the_environment_drive_logging(
    tmp_path: Path, logger_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    loaded = load_settings(
        cli={},
        environ={
            "SIGNPATH_LOG_FILE_DIRECTORY": str(tmp_path / "logs"),
            "SIGNPATH_LOG_FILE_LEVEL": "warning",
            "SIGNPATH_LOG_CONSOLE_LEVEL": "error",
            "SIGNPATH_API_TOKEN": f"{ORG}:{TOKEN}",
            "http_proxy": "http://me:hunter2-proxy@proxy:3128",
        },
        program_dir=tmp_path,
    )
    logger = configure_logging(loaded, name=logger_name)
    logger.info("not written")
    logger.warning("settings %s via %s", loaded.redacted(), loaded.http_proxy)
    logger.error("token %s", loaded.api_token)
    text = log_text(tmp_path)
    assert "not written" not in text
    assert "'api_token': '***'" in text and "via http://me:***@proxy:3128" in text
    assert "token ***" in text and TOKEN not in text and "hunter2-proxy" not in text
    assert capsys.readouterr().err == f"ERROR {logger_name}: token ***\n"
