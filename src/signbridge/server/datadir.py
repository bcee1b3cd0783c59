"""Creating and opening a data directory: settings, database, keystore."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from ..errors import ConfigError
from .audit_chain import ensure_head
from .checkpoints import ensure_checkpoint_key
from .database import create_schema, open_engine, sqlite_url, writing
from .keystores import Keystore
from .keystores.factory import open_keystore
from .settings import SETTINGS_FILE, ServerSettings


@dataclass
class DataDir:
    settings: ServerSettings
    engine: Engine
    keystore: Keystore

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        with writing(self.engine.connect()) as connection, Session(bind=connection) as session, session.begin():
            yield session

    def ensure_checkpoint_key(self) -> None:
        """The audit checkpoint key (see :mod:`.checkpoints`), created in the keystore if missing."""
        with self.session() as session:
            ensure_checkpoint_key(session, self.keystore)

    def close(self) -> None:
        self.keystore.close()
        self.engine.dispose()


def init_data_dir(
    data_dir: Path, *, database_url: str | None = None, keystore: dict[str, Any] | None = None
) -> DataDir:
    data_dir = data_dir.resolve()
    if (data_dir / SETTINGS_FILE).exists():
        raise ConfigError(f"{data_dir} is already a signbridge data directory")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    settings = ServerSettings(
        data_dir=data_dir,
        database_url=database_url or sqlite_url(data_dir),
        keystore=keystore or {"backend": "software"},
    )
    engine = open_engine(settings.database_url)
    create_schema(engine)
    ensure_head(engine)
    store = open_keystore(data_dir, settings.keystore)
    settings.save()
    data = DataDir(settings, engine, store)
    data.ensure_checkpoint_key()
    return data


def open_data_dir(data_dir: Path, *, database_url: str | None = None) -> DataDir:
    settings = ServerSettings.load(data_dir.resolve(), database_url=database_url)
    engine = open_engine(settings.database_url)
    create_schema(engine)
    ensure_head(engine)
    return DataDir(settings, engine, open_keystore(settings.data_dir, settings.keystore))
