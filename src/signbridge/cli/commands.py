"""The commands of ``signbridge``: each one's module and help, and how its module is found.

A command's module is imported only when that command runs (see :data:`COMMANDS`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Command name -> ("module:attribute", the one-line help). A command's module is imported only when
# that command runs: `signbridge start` should not pay for the service's database layer, nor
# codesign for the server, nor `signbridge --help` for any of them.
COMMANDS = {
    "server": ("server:server", "Create a data directory and run the signing service."),
    "admin": ("admin:admin", "Administer the signing service's data directory."),
    "audit": ("audit:audit", "Check audit exports offline."),
    "demo": ("demo:demo", "Run the whole signing path on a temporary demo service."),
    "start": ("provider:start", "Serve the certificates you may sign with as a PKCS#11 token."),
    "stop": ("provider:stop", "Stop a token (the only one running, NAME, or --all)."),
    "status": ("provider:status", "The running tokens, their identities and registration."),
    "restart": ("provider:restart", "Reload the certificates of every running token."),
    "security": ("security:security", "Tokens and identities, as macOS's `security` shows them."),
    "pluginkit": ("security:pluginkit", "The registered token driver, as `pluginkit -m -v -p` shows it."),
    "codesign": ("codesign:run", "Sign, verify and display code signatures (Apple's codesign)."),
    "productsign": ("productsign:productsign", "Sign an installer package (Apple's productsign)."),
    "pkgutil": ("productsign:pkgutil", "Check an installer package's signature (Apple's pkgutil)."),
    "notarytool": ("notarytool:notarytool", "Check, submit and follow notarization (Apple's notarytool)."),
    "stapler": ("stapler:stapler", "Staple and validate notarization tickets (Apple's stapler)."),
}
# Commands that parse their own arguments, as Apple's tool does (their target is a function from
# the arguments to the exit code, not a click command). `signbridge codesign ...` runs them without
# importing click, a good part of a short command's start-up.
OWN_ARGUMENTS = frozenset({"codesign"})


def command_target(name: str) -> Any:
    """The object COMMANDS names for ``name``: a click command, or an OWN_ARGUMENTS function."""
    module_name, attribute = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), attribute)
