"""The corpus of real artifacts made by Apple's tools, read in place from ``../shared/corpus``.

The corpus sits beside the repository (it is there in CI). A missing corpus fails the test that
asks for it, never skips it: the suite cannot pass without having run on real Apple output.
Tests never copy a corpus item into the repository; they copy it into ``tmp_path`` when they
need to change it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT

CORPUS = Path(os.environ.get("SIGNBRIDGE_CORPUS", ROOT.parent / "shared" / "corpus"))
APPLE_ROOT = CORPUS / "anchors" / "AppleRootCA.pem"


def corpus_item(relative: str) -> Path:
    """The path of one corpus item, or a test failure naming what is missing."""
    path = CORPUS / relative
    if not path.exists():
        pytest.fail(f"corpus item {relative} is missing from {CORPUS}; the corpus must sit beside the repository")
    return path


def corpus_items(folder: str, *suffixes: str) -> list[str]:
    """The items of one corpus folder (relative paths), for parametrizing; fails at collection if absent."""
    directory = CORPUS / folder
    if not directory.is_dir():
        raise RuntimeError(f"the corpus folder {directory} is missing; the corpus must sit beside the repository")
    return sorted(
        f"{folder}/{entry.name}"
        for entry in directory.iterdir()
        if not suffixes or entry.name.endswith(suffixes)
    )


def copy_item(relative: str, destination: Path) -> Path:
    """A writable copy of a corpus item (file or bundle directory) under ``destination``."""
    source = corpus_item(relative)
    target = destination / source.name
    if source.is_dir():
        shutil.copytree(source, target, symlinks=True)
    else:
        shutil.copy2(source, target)
    return target


def apple_anchor_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """An environment that evaluates corpus items as a Mac would: Apple Root CA as the trust anchor."""
    env = dict(os.environ)
    env["SIGNBRIDGE_ANCHORS"] = str(corpus_item("anchors/AppleRootCA.pem"))
    env.update(extra or {})
    return env
