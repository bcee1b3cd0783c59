"""The service's settings file, ``server.json`` in the data directory."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .database import sqlite_url

SETTINGS_FILE = "server.json"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


@dataclass
class ServerSettings:
    data_dir: Path
    database_url: str
    keystore: dict[str, Any] = field(default_factory=lambda: {"backend": "software"})
    # Requests per minute per API token; 0 turns the limit off.
    rate_limit_per_minute: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def path(self) -> Path:
        return self.data_dir / SETTINGS_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "databaseUrl": self.database_url,
            "keystore": self.keystore,
            "rateLimitPerMinute": self.rate_limit_per_minute,
            "maxBodyBytes": self.max_body_bytes,
        }

    def save(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_json(), handle, indent=2)
            handle.write("\n")
        os.replace(temporary, self.path)

    @classmethod
    def load(cls, data_dir: Path, *, database_url: str | None = None) -> ServerSettings:
        path = data_dir / SETTINGS_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{data_dir} is not a signbridge data directory (no {SETTINGS_FILE}); "
                "create one with `signbridge server init --data-dir DIR`"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        known = {"databaseUrl": str, "keystore": dict, "rateLimitPerMinute": int, "maxBodyBytes": int}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            if not isinstance(value, known[key]) or isinstance(value, bool):
                raise ConfigError(f"{path}: {key} must be a {known[key].__name__}")
        return cls(
            data_dir=data_dir,
            database_url=database_url or raw.get("databaseUrl") or sqlite_url(data_dir),
            keystore=raw.get("keystore", {"backend": "software"}),
            rate_limit_per_minute=raw.get("rateLimitPerMinute", 0),
            max_body_bytes=raw.get("maxBodyBytes", DEFAULT_MAX_BODY_BYTES),
        )
