"""The Apple tools read only their own settings: a bad provider setting never stops them, a bad one of theirs does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corpuskit import corpus_item
from signbridge.apple.settings import load_tool_settings
from signbridge.errors import ConfigError
from signbridge.provider.settings import load_settings

DYLIB = "macho/htacg_tidy-mac-installer__libtidy.5.6.0.dylib"
PACKAGE = "pkg/htacg_binaries__HTML_Tidy-5.2.0.pkg"
TSA = "http://127.0.0.1:9/tsa"


def _environment(tmp_path: Path, document: dict, **extra: str) -> dict[str, str]:
    """Only the config file (and ``extra``) as settings: none of the runner's own."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(document))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SIGNPATH_CONFIG_FILE": str(config)}
    return {**env, **extra}


def _bad_provider_settings() -> dict:
    return {
        "TrustAnchors": str(corpus_item("anchors/AppleRootCA.pem")),
        "TimestampUrl": TSA,
        "HttpProxy": "http://proxy.example:notaport",
        "Log": {"File": {"Level": "loud"}},
    }


def _signbridge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "signbridge", *args], capture_output=True, text=True, env=env, check=False)


def test_a_bad_provider_setting_does_not_stop_the_apple_tools(tmp_path: Path) -> None:
    env = _environment(tmp_path, _bad_provider_settings(), SIGNPATH_HTTP_REQUEST_TIMEOUT_IN_SECONDS="soon")
    with pytest.raises(ConfigError, match=r'HttpProxy must be host:port or http://host:port, not "http://proxy.example:notaport"'):
        load_settings(cli={}, environ=env)

    path = corpus_item(DYLIB)
    verified = _signbridge(env, "codesign", "--verify", "-v", str(path))
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr == f"{path}: valid on disk\n{path}: satisfies its Designated Requirement\n"
    displayed = _signbridge(env, "codesign", "-dvvv", str(path))
    assert displayed.returncode == 0, displayed.stderr
    assert "Authority=Developer ID Application: James Derry (9PN2JXXG7Y)" in displayed.stderr
    checked = _signbridge(env, "pkgutil", "--check-signature", str(corpus_item(PACKAGE)))
    assert checked.returncode == 0, checked.stderr
    assert "Status: signed by a developer certificate issued by Apple" in checked.stdout

    settings = load_tool_settings(environ=env)  # what productsign and codesign -s read
    assert settings.trust_anchors == (corpus_item("anchors/AppleRootCA.pem"),)
    assert settings.timestamp_url == TSA


def test_a_bad_setting_the_apple_tools_use_is_still_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-anchors.pem"
    env = _environment(tmp_path, {**_bad_provider_settings(), "TrustAnchors": str(missing)})
    verified = _signbridge(env, "codesign", "--verify", "-v", str(corpus_item(DYLIB)))
    assert verified.returncode != 0
    assert f"{env['SIGNPATH_CONFIG_FILE']}: TrustAnchors names {missing}, which does not exist" in verified.stderr

    env = _environment(tmp_path, {**_bad_provider_settings(), "TimestampUrl": "ftp://tsa.example"})
    with pytest.raises(ConfigError) as caught:
        load_tool_settings(environ=env)
    assert str(caught.value) == (
        f"{env['SIGNPATH_CONFIG_FILE']}: TimestampUrl must be a timestamp authority URL starting with "
        'https:// or http://, not "ftp://tsa.example"'
    )
