"""Opening the database: embedded SQLite (WAL, durable commits) or a PostgreSQL URL."""

from __future__ import annotations

import functools
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, OperationalError

from ..errors import ConfigError
from .models import Base


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'signbridge.db'}"


def open_engine(url: str) -> Engine:
    """An engine on ``url``; for SQLite, writes take the lock when they begin and commits are fsynced."""
    try:
        if url.startswith("sqlite"):
            # One connection per worker thread, kept: opening one costs more than the query.
            engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=48, max_overflow=16
            )
            _make_sqlite_durable(engine)
        else:
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
            engine = create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    except (ArgumentError, ModuleNotFoundError) as exc:
        raise ConfigError(f"cannot use database URL {redact_url(url)}: {exc}") from None
    return engine


def _make_sqlite_durable(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # noqa: ANN001
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:  # noqa: ANN001
        # Reads run in autocommit and never block in WAL mode; writers take the lock up front (see
        # ``writing``) so that two writers cannot deadlock upgrading a read lock.
        if connection.get_execution_options().get(WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")


WRITE_OPTION = "signbridge_write"


def writing(connection: Connection) -> Connection:
    """Mark a connection whose next transaction writes (SQLite then takes the write lock at BEGIN)."""
    return connection.execution_options(**{WRITE_OPTION: True})


@functools.cache
def _driver_sql(paramstyle: str, sql: str) -> str:
    return sql if paramstyle == "qmark" else sql.replace("?", "%s")


def driver_sql(engine: Engine, sql: str) -> str:
    """``sql`` written with ``?`` placeholders, in the driver's own parameter style. The hot paths
    send SQL straight to the driver: it costs a fraction of building SQLAlchemy statements."""
    return _driver_sql(engine.dialect.paramstyle, sql)


def create_schema(engine: Engine) -> None:
    try:
        Base.metadata.create_all(engine)
    except OperationalError as exc:
        raise ConfigError(f"cannot create the database schema at {redact_url(str(engine.url))}: {exc.orig}") from None


def redact_url(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
