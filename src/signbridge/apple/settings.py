"""The settings the Apple tools read (codesign, productsign, pkgutil): trust anchors and the TSA.

They come from the same sources as the provider's, with the same names (``TrustAnchors`` /
``SIGNBRIDGE_ANCHORS``, ``TimestampUrl`` / ``SIGNBRIDGE_TIMESTAMP_URL``; see
:mod:`signbridge.config`), but only these two are read: a provider setting the tools do not use
never stops them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import read_settings


@dataclass(frozen=True)
class ToolSettings:
    trust_anchors: tuple[Path, ...] = ()
    timestamp_url: str | None = None

    @property
    def anchors_value(self) -> str | None:
        """The trust anchors as ``SIGNBRIDGE_ANCHORS`` writes them (``os.pathsep`` between), or None."""
        return os.pathsep.join(str(path) for path in self.trust_anchors) or None


def load_tool_settings(*, environ: Mapping[str, str] = os.environ, program_dir: Path | None = None) -> ToolSettings:
    """The Apple tools' settings: environment > config file > defaults."""
    reading = read_settings(("trust_anchors", "timestamp_url"), cli={}, environ=environ, program_dir=program_dir)
    return ToolSettings(**reading.values)
