"""The package layout's rules, read from the source: no import cycles, readers never import writers,
and no module imports something above it. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


@cache
def import_graph() -> dict[str, set[str]]:
    modules: dict[str, tuple[Path, bool]] = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = name.split(".") if package else name.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    parent = ".".join([*base, node.module] if node.module else base)
                else:
                    parent = node.module or ""
                targets.add(parent)
                targets.update(f"{parent}.{alias.name}" for alias in node.names)
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        targets |= {target.rsplit(".", depth)[0] for target in targets for depth in range(1, target.count(".") + 1)}
        graph[name] = {target for target in targets if target in modules and target != name and not _within(name, (target,))}
    return graph


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


APPLE_TOOLS = ("signbridge.apple.codesign", "signbridge.apple.verify_code", "signbridge.apple.display")
FORMATS = ("signbridge.apple.macho", "signbridge.apple.bundle", "signbridge.apple.dmg", "signbridge.apple.pkg")
ABOVE_THE_LIBRARY = (
    "signbridge.cli",
    "signbridge.demo",
    "signbridge.server",
    "signbridge.provider",
    "signbridge.keychain",
)
WRITERS = (
    "signbridge.apple.codesign",
    "signbridge.apple.codesig.signer",
    "signbridge.apple.codesig.cms_signing",
    "signbridge.apple.macho.sign",
    "signbridge.apple.macho.writer",
    "signbridge.apple.bundle.sign",
    "signbridge.apple.bundle.staging",
    "signbridge.apple.bundle.detached_signing",
    "signbridge.apple.bundle.resources.writing",
    "signbridge.apple.dmg.sign",
    "signbridge.apple.pkg.sign",
    "signbridge.apple.pkg.xar.signing",
    "signbridge.apple.pkg.xar.writer",
    "signbridge.apple.notary.stapler",
    "signbridge.keychain",
    "signbridge.provider",
    "signbridge.crypto.cms_builder",
    "signbridge.crypto.der_encoding",
    "signbridge.crypto.timestamp_requests",
)
READERS = (
    "signbridge.crypto.ber",
    "signbridge.crypto.der_decoding",
    "signbridge.crypto.cms",
    "signbridge.crypto.timestamps",
    "signbridge.apple.codesig.cms",
    "signbridge.apple.display",
    "signbridge.apple.verify_code",
    "signbridge.apple.codesig.verification",
    "signbridge.apple.codesig.verdicts",
    "signbridge.apple.codesig.embedded_signature",
    "signbridge.apple.macho.parse",
    "signbridge.apple.macho.verify",
    "signbridge.apple.bundle.layout",
    "signbridge.apple.bundle.detached",
    "signbridge.apple.bundle.verify",
    "signbridge.apple.bundle.resources.checking",
    "signbridge.apple.bundle.resources.seal",
    "signbridge.apple.dmg.udif",
    "signbridge.apple.dmg.verify",
    "signbridge.apple.pkg.verify",
    "signbridge.apple.pkg.xar.archive",
    "signbridge.apple.notary.ticket",
    "signbridge.apple.notary.stapled",
)

MACHO_FILE_FORMAT = ("signbridge.apple.macho.parse", "signbridge.apple.macho.constants")
MACHO_ABOVE_CODESIG = ("signbridge.apple.macho.sign", "signbridge.apple.macho.writer", "signbridge.apple.macho.verify")
NOT_THE_FORMATS_BELOW = (
    "signbridge.apple.bundle",
    "signbridge.apple.dmg",
    "signbridge.apple.pkg",
    "signbridge.apple.notary",
    *APPLE_TOOLS,
    *ABOVE_THE_LIBRARY,
)

# (the modules, what they must never import): lower layers below higher ones, readers below writers.
RULES = [
    (("signbridge.errors", "signbridge.atomic"), ("signbridge",)),
    (("signbridge.crypto",), ("signbridge.apple", "signbridge.pkcs11", "signbridge.api", *ABOVE_THE_LIBRARY)),
    (("signbridge.pkcs11",), ("signbridge.apple", "signbridge.api", *ABOVE_THE_LIBRARY)),
    (("signbridge.api",), ("signbridge.apple", "signbridge.pkcs11", *ABOVE_THE_LIBRARY)),
    (
        ("signbridge.apple.plist", "signbridge.apple.certificates", "signbridge.apple.trust"),
        ("signbridge.apple", *ABOVE_THE_LIBRARY),
    ),
    (MACHO_FILE_FORMAT, ("signbridge.apple.codesig", *MACHO_ABOVE_CODESIG, *NOT_THE_FORMATS_BELOW)),
    (("signbridge.apple.codesig",), (*MACHO_ABOVE_CODESIG, *NOT_THE_FORMATS_BELOW)),
    (("signbridge.apple.macho",), NOT_THE_FORMATS_BELOW),
    (("signbridge.apple.dmg",), ("signbridge.apple.macho", "signbridge.apple.bundle", "signbridge.apple.pkg", *APPLE_TOOLS, *ABOVE_THE_LIBRARY)),
    (("signbridge.apple.pkg",), ("signbridge.apple.macho", "signbridge.apple.bundle", "signbridge.apple.dmg", *APPLE_TOOLS, *ABOVE_THE_LIBRARY)),
    (("signbridge.apple.bundle",), ("signbridge.apple.dmg", "signbridge.apple.pkg", *APPLE_TOOLS, *ABOVE_THE_LIBRARY)),
    (("signbridge.apple",), ABOVE_THE_LIBRARY),
    ((*READERS,), WRITERS),
    (
        ("signbridge.server",),
        (
            "signbridge.apple.codesig",
            *FORMATS,
            "signbridge.apple.notary",
            *APPLE_TOOLS,
            "signbridge.cli",
            "signbridge.demo",
            "signbridge.provider",
            "signbridge.keychain",
        ),
    ),
    (("signbridge.provider",), ("signbridge.apple", "signbridge.keychain", "signbridge.server", "signbridge.cli", "signbridge.demo")),
    (("signbridge.keychain",), ("signbridge.apple.codesig", *FORMATS, *APPLE_TOOLS, "signbridge.server", "signbridge.cli", "signbridge.demo")),
]


@pytest.mark.parametrize(("modules", "forbidden"), RULES, ids=[rule[0][0] for rule in RULES])
def test_layering(modules: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    graph = import_graph()
    offending = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if _within(module, modules)
        for target in targets
        if _within(target, forbidden) and not _within(target, modules)
    )
    assert offending == []
