"""The running signbridge tokens as the Apple tools name them, and whether p11-kit sees them.

A token is named by its registry name or its smartcard id, ``io.signbridge.token:<name>``, as
macOS names a CryptoTokenKit token ``com.apple.pivtoken:<card id>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import p11kit
from ..errors import NotFoundError
from ..provider import registry
from ..provider.registry import TokenRecord

DRIVER_ID = "io.signbridge.token"
"""The token driver's identifier: ``security list-smartcard`` prints ``<DRIVER_ID>:<token name>``,
as macOS prints ``com.apple.pivtoken:<card id>``. It never changes."""


class NoTokenError(NotFoundError):
    """No signbridge token is running (or none of the named ones)."""

    def __init__(self, message: str = "no signbridge token is running; start one with `signbridge start`"):
        super().__init__(message)


def smartcard_id(token: TokenRecord) -> str:
    """``io.signbridge.token:<name>``: what ``security list-smartcard`` prints for the token."""
    return f"{DRIVER_ID}:{token.name}"


def find_tokens(names: Iterable[str] | None = None) -> list[TokenRecord]:
    """The running tokens, or the running ones among ``names`` (a name may also be written as
    its smartcard id). Raises :class:`NoTokenError` when none is running or a name is not."""
    running = registry.running_tokens()
    if not running:
        raise NoTokenError()
    wanted = [name.removeprefix(f"{DRIVER_ID}:") for name in names or ()]
    if not wanted:
        return running
    by_name = {token.name: token for token in running}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        listed = ", ".join(sorted(by_name))
        raise NoTokenError(f'no signbridge token named "{missing[0]}" is running (running: {listed})')
    return [by_name[name] for name in dict.fromkeys(wanted)]


@dataclass(frozen=True)
class Registration:
    """Whether p11-kit, and so every p11-kit-proxy consumer, sees a running token."""

    registered: bool
    module: str | None  # the p11-kit module name (the module file's name without ".module")
    detail: str  # why not, or which module

    def describe(self) -> str:
        return f"{'yes' if self.registered else 'no'} ({self.detail})"


def p11kit_registration(token: TokenRecord, listing: p11kit.P11KitListing) -> Registration:
    """Whether ``listing`` shows the token's module file with the token in it, and if not, why."""
    if not token.module_file:
        return Registration(False, None, "the token was started without a p11-kit module file")
    module_path = Path(token.module_file)
    module = module_path.name.removesuffix(".module")
    if not module_path.is_file():
        return Registration(False, module, f"its module file {module_path} is missing")
    if listing.problem:
        return Registration(False, module, listing.problem)
    if module not in listing.modules:
        user_dir = p11kit.user_module_dir()
        if module_path.parent == user_dir and os.geteuid() == 0:
            why = f"p11-kit ignores the module files in {user_dir} when run as root"
            return Registration(False, module, why)
        if module_path.parent not in (user_dir, *p11kit.SYSTEM_MODULE_DIRS):
            return Registration(False, module, f"p11-kit does not read module files in {module_path.parent}")
        return Registration(False, module, f"p11-kit list-modules does not show module {module}")
    if token.name not in listing.modules[module]:
        return Registration(False, module, f"p11-kit lists module {module} but cannot reach the token in it")
    return Registration(True, module, f"module {module}")
