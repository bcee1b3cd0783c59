"""The service's settings file, ``server.json`` in the data directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_atomically
from ..errors import ConfigError
from .database import sqlite_url

SETTINGS_FILE = "server.json"
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0


@dataclass
class ServerSettings:
    data_dir: Path
    database_url: str
    keystore: dict[str, Any] = field(default_factory=lambda: {"backend": "software"})
    # Requests per minute per API token; 0 turns the limit off.
    rate_limit_per_minute: int = 0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed; by default none, so the audit
    # record's remote address is always the socket's peer.
    forwarded_allow_ips: list[str] = field(default_factory=list)
    # Seconds a client has to send a request's head, and then its body; slower clients are closed.
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    # Open connections one client address may hold in one worker process; 0 turns the cap off.
    max_connections_per_ip: int = 0
    # A signed checkpoint of the audit chain every so many records, and after so many seconds with
    # records not yet covered.
    audit_checkpoint_records: int = 1000
    audit_checkpoint_seconds: float = 60.0

    @property
    def path(self) -> Path:
        return self.data_dir / SETTINGS_FILE

    def to_json(self) -> dict[str, Any]:
        return {
            "databaseUrl": self.database_url,
            "keystore": self.keystore,
            "rateLimitPerMinute": self.rate_limit_per_minute,
            "maxBodyBytes": self.max_body_bytes,
            "forwardedAllowIps": self.forwarded_allow_ips,
            "headerTimeoutSeconds": self.header_timeout,
            "bodyTimeoutSeconds": self.body_timeout,
            "maxConnectionsPerIp": self.max_connections_per_ip,
            "auditCheckpointRecords": self.audit_checkpoint_records,
            "auditCheckpointSeconds": self.audit_checkpoint_seconds,
        }

    def save(self) -> None:
        write_atomically(self.path, (json.dumps(self.to_json(), indent=2) + "\n").encode(), mode=0o600)

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
        for key, value in raw.items():
            if key not in _KNOWN:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            kind, description = _KNOWN[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConfigError(f"{path}: {key} must be {description}")
        addresses = raw.get("forwardedAllowIps", [])
        if not all(isinstance(address, str) for address in addresses):
            raise ConfigError(f"{path}: forwardedAllowIps must be a list of addresses")
        for key in ("headerTimeoutSeconds", "bodyTimeoutSeconds", "auditCheckpointSeconds", "auditCheckpointRecords"):
            if key in raw and raw[key] <= 0:
                raise ConfigError(f"{path}: {key} must be positive")
        return cls(
            data_dir=data_dir,
            database_url=database_url or raw.get("databaseUrl") or sqlite_url(data_dir),
            keystore=raw.get("keystore", {"backend": "software"}),
            rate_limit_per_minute=raw.get("rateLimitPerMinute", 0),
            max_body_bytes=raw.get("maxBodyBytes", DEFAULT_MAX_BODY_BYTES),
            forwarded_allow_ips=addresses,
            header_timeout=float(raw.get("headerTimeoutSeconds", DEFAULT_HEADER_TIMEOUT)),
            body_timeout=float(raw.get("bodyTimeoutSeconds", DEFAULT_BODY_TIMEOUT)),
            max_connections_per_ip=raw.get("maxConnectionsPerIp", 0),
            audit_checkpoint_records=raw.get("auditCheckpointRecords", 1000),
            audit_checkpoint_seconds=float(raw.get("auditCheckpointSeconds", 60.0)),
        )


_KNOWN: dict[str, tuple[type | tuple[type, ...], str]] = {
    "databaseUrl": (str, "a string"),
    "keystore": (dict, "an object"),
    "rateLimitPerMinute": (int, "an integer"),
    "maxBodyBytes": (int, "an integer"),
    "forwardedAllowIps": (list, "a list of addresses"),
    "headerTimeoutSeconds": ((int, float), "a number"),
    "bodyTimeoutSeconds": ((int, float), "a number"),
    "maxConnectionsPerIp": (int, "an integer"),
    "auditCheckpointRecords": (int, "an integer"),
    "auditCheckpointSeconds": ((int, float), "a number"),
}
