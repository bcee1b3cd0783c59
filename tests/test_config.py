"""Provider settings: where each comes from, which source wins, and what a bad value says."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import platformdirs
import pytest
from platformdirs.macos import MacOS

from signbridge.config import DEFAULT_API_URL, default_program_dir, setting_names
from signbridge.errors import ConfigError
from signbridge.provider.settings import (
    ProviderSettings,
    default_log_directory,
    load_settings,
    parse_pin,
    require_connection_settings,
)

ORG = "0a1b2c3d-0000-4000-8000-00000000abcd"
OTHER_ORG = "11111111-2222-4333-8444-555555555555"
# The shape of a SignPath token (reference §2.5); not a real one.
TOKEN = "AIk/65sl23lA1nVV/pgSqk96SvHFsSw3xitmp5Qhr+F/"


def write_config(directory: Path, document: Any, name: str = "config.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


def load(tmp_path: Path, *, cli: dict[str, Any] | None = None, environ: dict[str, str] | None = None,
         program_dir: Path | None = None) -> ProviderSettings:
    if program_dir is None:
        program_dir = tmp_path / "bin"
        program_dir.mkdir(exist_ok=True)
    return load_settings(cli=cli or {}, environ=environ or {}, program_dir=program_dir)


def config_error(tmp_path: Path, document: Any = None, **kwargs: Any) -> str:
    """The message of the ConfigError that loading ``document`` (as --config) raises."""
    cli = dict(kwargs.pop("cli", {}))
    if document is not None:
        path = write_config(tmp_path / "conf", document)
        cli["config"] = str(path)
        before = path.read_bytes()
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, cli=cli, **kwargs)
    if document is not None:
        assert path.read_bytes() == before
    message = str(caught.value)
    assert TOKEN not in message
    return message


# ---- precedence ---------------------------------------------------------------------------------

# field, JSON key (dotted), env var, (file value, env value, cli value), (expected from file, env, cli)
# "{tmp}" in a value stands for the test's directory; the config file lives in {tmp}/conf.
PRECEDENCE = [
    ("api_url", "ApiUrl", "SIGNPATH_API_URL",
     ("https://file.example/Api", "https://env.example/Api", "http://127.0.0.1:8443/api/"),
     ("https://file.example/Api", "https://env.example/Api", "http://127.0.0.1:8443/api")),
    ("organization_id", "OrganizationId", "SIGNPATH_ORGANIZATION_ID",
     (ORG, OTHER_ORG.upper(), "22222222-3333-4444-8555-666666666666"),
     (ORG, OTHER_ORG, "22222222-3333-4444-8555-666666666666")),
    ("api_token", "ApiToken", "SIGNPATH_API_TOKEN",
     ("file-token-AAAA", "env-token-BBBB", "cli-token-CCCC"),
     ("file-token-AAAA", "env-token-BBBB", "cli-token-CCCC")),
    ("project_slug", "ProjectSlug", "SIGNPATH_PROJECT_SLUG",
     ("file-project", "env-project", "cli-project"), ("file-project", "env-project", "cli-project")),
    ("signing_policy_slug", "SigningPolicySlug", "SIGNPATH_SIGNING_POLICY_SLUG",
     ("test-signing", "release-signing", "cli-signing"), ("test-signing", "release-signing", "cli-signing")),
    ("http_request_timeout", "HttpRequestTimeoutInSeconds", "SIGNPATH_HTTP_REQUEST_TIMEOUT_IN_SECONDS",
     (10, "20", 30.5), (10.0, 20.0, 30.5)),
    ("service_unavailable_timeout", "ServiceUnavailableTimeoutInSeconds",
     "SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS", (0, "100", "200"), (0.0, 100.0, 200.0)),
    ("http_proxy", "HttpProxy", "http_proxy",
     ("proxy.file:3128", "http://proxy.env:8080", "https://proxy.cli:443"),
     ("http://proxy.file:3128", "http://proxy.env:8080", "https://proxy.cli:443")),
    ("log_console_level", "Log.Console.Level", "SIGNPATH_LOG_CONSOLE_LEVEL",
     ("warning", "DEBUG", "verbose"), ("warning", "debug", "verbose")),
    ("log_console_output_stream", "Log.Console.OutputStream", "SIGNPATH_LOG_CONSOLE_OUTPUT_STREAM",
     ("stdout", "stderr", "stdout"), ("stdout", "stderr", "stdout")),
    ("log_file_level", "Log.File.Level", "SIGNPATH_LOG_FILE_LEVEL",
     ("none", "error", "fatal"), ("none", "error", "fatal")),
    ("log_file_directory", "Log.File.Directory", "SIGNPATH_LOG_FILE_DIRECTORY",
     ("logs", "{tmp}/env-logs", "{tmp}/cli-logs"), ("{tmp}/conf/logs", "{tmp}/env-logs", "{tmp}/cli-logs")),
    ("cryptoki_do_not_fail_on_read_write_sessions", "Cryptoki.DoNotFailOnReadWriteSessions",
     "SIGNPATH_CRYPTOKI_DO_NOT_FAIL_ON_READ_WRITE_SESSIONS", (True, "false", True), (True, False, True)),
    ("include_dummy_x509_certificate_for_gpg_keys", "IncludeDummyX509CertificateForGpgKeys",
     "SIGNPATH_INCLUDE_DUMMY_X509CERTIFICATE_FOR_GPG_KEYS", (True, "no", "yes"), (True, False, True)),
    ("trust_anchors", "TrustAnchors", "SIGNBRIDGE_ANCHORS",
     (["a.pem"], "{tmp}/b.pem" + os.pathsep + "{tmp}/c.pem", ("{tmp}/c.pem",)),
     (("{tmp}/conf/a.pem",), ("{tmp}/b.pem", "{tmp}/c.pem"), ("{tmp}/c.pem",))),
    ("timestamp_url", "TimestampUrl", "SIGNBRIDGE_TIMESTAMP_URL",
     ("http://tsa.file.example/", "https://tsa.env.example", "http://localhost:8443/tsa"),
     ("http://tsa.file.example", "https://tsa.env.example", "http://localhost:8443/tsa")),
    ("ca_bundle", "CaBundle", "SIGNBRIDGE_CA_BUNDLE",
     ("a.pem", "{tmp}/b.pem", "{tmp}/c.pem"), ("{tmp}/conf/a.pem", "{tmp}/b.pem", "{tmp}/c.pem")),
]


def _fill(value: Any, tmp: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{tmp}", str(tmp))
    if isinstance(value, list | tuple):
        return type(value)(_fill(item, tmp) for item in value)
    return value


def _expect(field: str, value: Any, tmp: Path) -> Any:
    value = _fill(value, tmp)
    if field in ("log_file_directory", "ca_bundle"):
        return Path(value)
    if field == "trust_anchors":
        return tuple(Path(item) for item in value)
    return value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    document: dict[str, Any] = {}
    *sections, leaf = dotted.split(".")
    node = document
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    return document


def test_precedence_covers_every_setting() -> None:
    fields = {f.name for f in ProviderSettings.__dataclass_fields__.values()}
    assert fields - {"config_file", "sources", "warnings"} == {case[0] for case in PRECEDENCE}


@pytest.mark.parametrize(("field", "key", "variable", "given", "expected"), PRECEDENCE, ids=[c[1] for c in PRECEDENCE])
def test_command_line_over_environment_over_file(
    tmp_path: Path, field: str, key: str, variable: str, given: tuple, expected: tuple
) -> None:
    for name in ("a.pem", "b.pem", "c.pem"):
        (tmp_path / name).write_text("anchor")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "a.pem").write_text("anchor")
    file_value, env_value, cli_value = (_fill(value, tmp_path) for value in given)
    path = write_config(tmp_path / "conf", _nest(key, file_value))
    environ = {"SIGNPATH_CONFIG_FILE": str(path)}

    from_file = load(tmp_path, environ=environ)
    assert getattr(from_file, field) == _expect(field, expected[0], tmp_path)
    assert from_file.sources[field] == f"{path}: {key}"

    environ[variable] = env_value
    from_env = load(tmp_path, environ=environ)
    assert getattr(from_env, field) == _expect(field, expected[1], tmp_path)
    assert from_env.sources[field] == f"environment variable {variable}"

    from_cli = load(tmp_path, environ=environ, cli={field: cli_value})
    assert getattr(from_cli, field) == _expect(field, expected[2], tmp_path)
    assert from_cli.sources[field] == setting_names(field)["flag"]


def test_defaults_without_any_source(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.api_url == DEFAULT_API_URL == "https://app.signpath.io/Api"
    assert (settings.organization_id, settings.api_token, settings.project_slug) == (None, None, None)
    assert (settings.http_request_timeout, settings.service_unavailable_timeout) == (30.0, 600.0)
    assert (settings.log_console_level, settings.log_console_output_stream, settings.log_file_level) == (
        "none", "stderr", "info")
    assert settings.log_file_directory == default_log_directory({})
    assert settings.config_file is None and settings.sources == {} and settings.warnings == ()


def test_signpath_sample_file_and_dotted_keys(tmp_path: Path) -> None:
    # The sample from SignPath's docs (reference §2.4), with its placeholders filled in.
    sample = (
        '{ "ApiUrl": "https://app.signpath.io/Api", "OrganizationId": "$OrganizationId", "ApiToken": "$ApiToken",\n'
        '  "Log": { "Console": { "Level": "warning" }, "File": { "Level": "info", "Directory": "/var/log/sp" } } }'
    ).replace("$OrganizationId", ORG).replace("$ApiToken", TOKEN)
    settings = load(tmp_path, cli={"config": write_config(tmp_path / "a", sample)})
    assert (settings.organization_id, settings.api_token) == (ORG, TOKEN)
    assert (settings.log_console_level, settings.log_file_level) == ("warning", "info")
    assert settings.log_file_directory == Path("/var/log/sp")

    dotted = {"Log.Console.Level": "debug", "Log.File": {"Directory": "d"}, "Cryptoki.DoNotFailOnReadWriteSessions": True}
    settings = load(tmp_path, cli={"config": write_config(tmp_path / "b", dotted)})
    assert settings.log_console_level == "debug"
    assert settings.log_file_directory == tmp_path / "b" / "d"
    assert settings.cryptoki_do_not_fail_on_read_write_sessions is True


def test_windows_skeleton_with_bom_and_empty_values(tmp_path: Path) -> None:
    path = tmp_path / "CryptoProvidersConfig.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"OrganizationId": "", "ApiToken": None, "ApiUrl": ""}).encode())
    settings = load(tmp_path, cli={"config": str(path)}, environ={"SIGNPATH_API_TOKEN": TOKEN})
    assert settings.organization_id is None
    assert settings.api_token == TOKEN
    assert settings.api_url == DEFAULT_API_URL


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ProjectSlug": "from-file"})
    settings = load(tmp_path, cli={"config": path}, environ={"SIGNPATH_PROJECT_SLUG": ""})
    assert settings.project_slug == "from-file"


# ---- which config file --------------------------------------------------------------------------


def test_default_config_json_beside_the_program(tmp_path: Path) -> None:
    program_dir = tmp_path / "opt" / "signbridge" / "bin"
    path = write_config(program_dir, {"ProjectSlug": "beside-the-program"})
    settings = load(tmp_path, program_dir=program_dir)
    assert settings.project_slug == "beside-the-program"
    assert settings.config_file == path


def test_absent_default_config_json_is_fine(tmp_path: Path) -> None:
    settings = load(tmp_path, program_dir=tmp_path / "nowhere", environ={"SIGNPATH_ORGANIZATION_ID": ORG})
    assert settings.config_file is None
    assert settings.organization_id == ORG


def test_config_file_choice_order(tmp_path: Path) -> None:
    program_dir = tmp_path / "bin"
    write_config(program_dir, {"ProjectSlug": "default"})
    named = write_config(tmp_path / "env", {"ProjectSlug": "named"})
    given = write_config(tmp_path / "cli", {"ProjectSlug": "given"})
    environ = {"SIGNPATH_CONFIG_FILE": str(named)}
    assert load(tmp_path, program_dir=program_dir).project_slug == "default"
    assert load(tmp_path, program_dir=program_dir, environ=environ).project_slug == "named"
    assert load(tmp_path, program_dir=program_dir, environ=environ, cli={"config": given}).project_slug == "given"


def test_program_dir_from_the_installed_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "opt" / "signbridge" / "bin"
    real.mkdir(parents=True)
    (real / "signbridge").write_text("#!/bin/sh\n")
    (tmp_path / "usr-bin").mkdir()
    (tmp_path / "usr-bin" / "signbridge").symlink_to(real / "signbridge")
    write_config(real, {"SigningPolicySlug": "release-signing"})
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "usr-bin" / "signbridge"), "start"])
    assert default_program_dir() == real
    settings = load_settings(cli={}, environ={})
    assert settings.signing_policy_slug == "release-signing"
    assert settings.config_file == real / "config.json"


def test_missing_explicit_config_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    message = config_error(tmp_path, cli={"config": str(missing)})
    assert message.startswith("--config") and str(missing) in message and "does not exist" in message
    message = config_error(tmp_path, environ={"SIGNPATH_CONFIG_FILE": str(missing)})
    assert "SIGNPATH_CONFIG_FILE" in message and str(missing) in message


# ---- errors in the file -------------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    directory = tmp_path / "config.json"
    directory.mkdir()
    message = config_error(tmp_path, cli={"config": str(directory)})
    assert f"cannot read config file {directory}" in message

    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"ApiUrl": "\xff\xfe"}')
    message = config_error(tmp_path, cli={"config": str(binary)})
    assert str(binary) in message and "not UTF-8" in message


def test_not_json_names_line_and_column(tmp_path: Path) -> None:
    message = config_error(tmp_path, '{"ApiToken": "' + TOKEN + '",\n  "OrganizationId" }')
    assert "conf/config.json is not valid JSON" in message
    assert "Expecting ':' delimiter at line 2, column 20" in message


@pytest.mark.parametrize(("document", "kind"), [("[1, 2]", "an array"), ('"text"', "a string"), ("42", "a single value")])
def test_top_level_must_be_an_object(tmp_path: Path, document: str, kind: str) -> None:
    message = config_error(tmp_path, document)
    assert "conf/config.json: the config file must hold a JSON object" in message and kind in message


@pytest.mark.parametrize(
    ("document", "unknown", "suggestion"),
    [
        ({"ApiTokne": TOKEN}, "ApiTokne", "did you mean ApiToken?"),
        ({"apiToken": TOKEN}, "apiToken", "did you mean ApiToken?"),
        ({"OrganisationId": ORG}, "OrganisationId", "did you mean OrganizationId?"),
        ({"Log": {"Consol": {"Level": "info"}}}, "Log.Consol", "did you mean Log.Console?"),
        ({"Log": {"File": {"Dir": "x"}}}, "Log.File.Dir", "did you mean Log.File.Directory?"),
        ({"ServiceUnavailableTimeout": 5}, "ServiceUnavailableTimeout",
         "did you mean ServiceUnavailableTimeoutInSeconds?"),
        ({"Zzz": 1}, "Zzz", "known keys: ApiToken, ApiUrl, CaBundle, Cryptoki, HttpProxy"),
    ],
)
def test_unknown_key_suggests_the_closest(tmp_path: Path, document: dict, unknown: str, suggestion: str) -> None:
    message = config_error(tmp_path, {"ApiToken": TOKEN, **document} if "ApiTokne" not in document else document)
    assert f'conf/config.json: unknown key "{unknown}"' in message
    assert suggestion in message


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"ServiceUnavailableTimeoutInSeconds": "ten"},
         'ServiceUnavailableTimeoutInSeconds must be a number of seconds, not "ten"'),
        ({"ServiceUnavailableTimeoutInSeconds": "600"}, "not \"600\" (write the number without quotes)"),
        ({"HttpRequestTimeoutInSeconds": True}, "HttpRequestTimeoutInSeconds must be a number of seconds, not true"),
        ({"HttpRequestTimeoutInSeconds": [30]}, "HttpRequestTimeoutInSeconds must be a number of seconds"),
        ('{"HttpRequestTimeoutInSeconds": NaN}', "HttpRequestTimeoutInSeconds must be a finite number"),
        ({"ProjectSlug": 7}, "ProjectSlug must be a string, not 7"),
        ({"ProjectSlug": "app/release"}, "ProjectSlug must be a single slug without '/'"),
        ({"Log": "info"}, 'Log must be an object like {"Console": ...}, not "info"'),
        ({"Log": {"Console": {"Level": {"x": 1}}}}, "Log.Console.Level must be a string"),
        ({"Cryptoki": {"DoNotFailOnReadWriteSessions": "true"}},
         'Cryptoki.DoNotFailOnReadWriteSessions must be true or false, not "true"'),
        ({"TrustAnchors": 5}, "TrustAnchors must be a path or a list of paths"),
        ({"TrustAnchors": ["missing.pem"]}, "TrustAnchors names "),
        ({"CaBundle": "missing.pem"}, "CaBundle names "),
        ({"CaBundle": "."}, "which is not a file"),
    ],
)
def test_wrong_type_names_file_and_key(tmp_path: Path, document: Any, expected: str) -> None:
    if isinstance(document, dict):
        document = {"ApiToken": TOKEN, **document}
    message = config_error(tmp_path, document)
    assert message.startswith(f"{tmp_path / 'conf' / 'config.json'}: ")
    assert expected in message


@pytest.mark.parametrize("key", ["Log.Console.Level", "Log.File.Level"])
def test_invalid_log_level(tmp_path: Path, key: str) -> None:
    message = config_error(tmp_path, {"ApiToken": TOKEN, **_nest(key, "loud")})
    assert f"config.json: {key} must be one of none, fatal, error, warning, info, debug, verbose" in message
    assert '"loud"' in message
    message = config_error(tmp_path, {"Log.Console.OutputStream": "stdlog"})
    assert "Log.Console.OutputStream must be one of stdout, stderr" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("ApiUrl", "app.signpath.io/Api", "ApiUrl must be the service's API URL starting with https:// or http://"),
        ("ApiUrl", "ftp://app.signpath.io/Api", "ApiUrl must be the service's API URL starting with https://"),
        ("ApiUrl", "https://app.signpath.io:99999/Api", "ApiUrl must be"),
        ("ApiUrl", "https://app.signpath.io/Api?x=1", "ApiUrl must be the service's API URL without a query"),
        ("TimestampUrl", "timestamp.example", "TimestampUrl must be a timestamp authority URL"),
        ("HttpProxy", "socks5://proxy:1080", "HttpProxy must be host:port or http://host:port"),
        ("HttpProxy", "proxy:port", "HttpProxy must be host:port or http://host:port"),
    ],
)
def test_invalid_url(tmp_path: Path, key: str, value: str, expected: str) -> None:
    message = config_error(tmp_path, {"ApiToken": TOKEN, key: value})
    assert "conf/config.json: " + expected in message


@pytest.mark.parametrize("value", ["my-organization", "0a1b2c3d00004000800000000000abcd", ORG + "x", "{" + ORG + "}"])
def test_malformed_organization_id(tmp_path: Path, value: str) -> None:
    message = config_error(tmp_path, {"ApiToken": TOKEN, "OrganizationId": value})
    assert "config.json: OrganizationId must be a GUID" in message
    assert json.dumps(value) in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("ServiceUnavailableTimeoutInSeconds", -1, "must not be negative (got -1)"),
        ("HttpRequestTimeoutInSeconds", -0.5, "must not be negative (got -0.5)"),
        ("HttpRequestTimeoutInSeconds", 0, "must be more than 0 seconds"),
    ],
)
def test_negative_timeouts(tmp_path: Path, key: str, value: float, expected: str) -> None:
    message = config_error(tmp_path, {"ApiToken": TOKEN, key: value})
    assert f"config.json: {key} {expected}" in message


def test_key_given_twice(tmp_path: Path) -> None:
    message = config_error(tmp_path, '{"ApiToken": "' + TOKEN + '", "ProjectSlug": "a", "ProjectSlug": "b"}')
    assert 'config.json: key "ProjectSlug" appears twice' in message
    message = config_error(tmp_path, {"Log.Console.Level": "info", "Log": {"Console": {"Level": "debug"}}})
    assert "config.json: Log.Console.Level is given twice" in message


# ---- the API token ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("encrypted:AQAAANCMnd8BFdERjHoAwE/Cl+sBAAAA" + TOKEN, 'DPAPI-encrypted token ("encrypted:..."), which only Windows'),
        ("registry:HKEY_CURRENT_USER\\SOFTWARE\\SignPath\\" + TOKEN, 'DPAPI-encrypted token ("registry:...")'),
        ("Bearer " + TOKEN, "contains spaces or control characters"),
        (TOKEN + "\u0007", "contains spaces or control characters"),
    ],
)
def test_unusable_token_forms(tmp_path: Path, token: str, expected: str) -> None:
    message = config_error(tmp_path, {"ApiToken": token})
    assert "config.json: ApiToken is a " in message or "config.json: ApiToken contains" in message
    assert expected in message
    message = config_error(tmp_path, environ={"SIGNPATH_API_TOKEN": token})
    assert message.startswith("environment variable SIGNPATH_API_TOKEN ") and expected in message
    message = config_error(tmp_path, cli={"api_token": token})
    assert message.startswith("--api-token ") and expected in message


def test_token_of_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"ApiToken": 31415926535})
    assert message.endswith("config.json: ApiToken must be a string")
    assert "31415926535" not in message


def test_token_is_trimmed_and_keeps_trusted_build_system_form(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"SIGNPATH_API_TOKEN": f"  {TOKEN}:build-system-token\n"})
    assert settings.api_token == f"{TOKEN}:build-system-token"
    assert settings.organization_id is None


def test_organization_and_token_pin_form(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"SIGNPATH_API_TOKEN": f"{ORG.upper()}:{TOKEN}"})
    assert (settings.organization_id, settings.api_token) == (ORG, TOKEN)
    assert settings.sources["organization_id"] == "environment variable SIGNPATH_API_TOKEN"

    same = load(tmp_path, environ={"SIGNPATH_API_TOKEN": f"{ORG}:{TOKEN}", "SIGNPATH_ORGANIZATION_ID": ORG})
    assert (same.organization_id, same.api_token) == (ORG, TOKEN)

    message = config_error(tmp_path, environ={"SIGNPATH_API_TOKEN": f"{ORG}:{TOKEN}"}, cli={"organization_id": OTHER_ORG})
    assert "environment variable SIGNPATH_API_TOKEN has the form $OrganizationId:$ApiToken" in message
    assert ORG in message and f"--organization-id is {OTHER_ORG}" in message


def test_legacy_token_names(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={"SIGNPATH_CI_USER_TOKEN": TOKEN})
    assert settings.api_token == TOKEN
    assert settings.sources["api_token"] == "environment variable SIGNPATH_CI_USER_TOKEN"

    both = load(tmp_path, environ={"SIGNPATH_CI_USER_TOKEN": "old-token-XYZ", "SIGNPATH_API_TOKEN": TOKEN})
    assert both.api_token == TOKEN
    assert both.warnings == (
        "environment variable SIGNPATH_CI_USER_TOKEN is ignored because SIGNPATH_API_TOKEN is set",)
    assert "old-token-XYZ" not in repr(both)

    path = write_config(tmp_path / "conf", {"CIUserToken": TOKEN})
    from_file = load(tmp_path, cli={"config": path})
    assert from_file.api_token == TOKEN and from_file.sources["api_token"] == f"{path}: CIUserToken"

    path = write_config(tmp_path / "conf2", {"CIUserToken": "old-token-XYZ", "ApiToken": TOKEN})
    both = load(tmp_path, cli={"config": path})
    assert both.api_token == TOKEN
    assert both.warnings == (f"{path}: CIUserToken is ignored because ApiToken is set",)


def test_settings_signpath_removed_are_accepted_with_warnings(tmp_path: Path) -> None:
    path = write_config(tmp_path, {
        "Timeouts": {"HttpRequest": 45, "FirstRetryDelay": 1.16, "RetryCount": 10},
        "TlsClientCertificate": "thumbprint:00AA",
    })
    settings = load(tmp_path, cli={"config": path})
    assert settings.http_request_timeout == 45.0
    assert settings.sources["http_request_timeout"] == f"{path}: Timeouts.HttpRequest"
    assert len(settings.warnings) == 3
    assert any("Timeouts.RetryCount is ignored: SignPath replaced it with ServiceUnavailable" in w for w in settings.warnings)
    assert any("TlsClientCertificate is ignored" in w for w in settings.warnings)


def test_plain_http_api_url_warns_unless_loopback(tmp_path: Path) -> None:
    assert load(tmp_path, cli={"api_url": "http://localhost:8443/api"}).warnings == ()
    remote = load(tmp_path, cli={"api_url": "http://sign.example.com/api"})
    assert remote.warnings == ("ApiUrl http://sign.example.com/api is not HTTPS: the API token travels unencrypted",)


# ---- environment and command-line errors --------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SIGNPATH_HTTP_REQUEST_TIMEOUT_IN_SECONDS", "thirty", "must be a number of seconds"),
        ("SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS", "-3", "must not be negative"),
        ("SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS", "inf", "must be a finite number"),
        ("SIGNPATH_ORGANIZATION_ID", "acme", "must be a GUID"),
        ("SIGNPATH_LOG_FILE_LEVEL", "trace", "must be one of none, fatal"),
        ("SIGNPATH_LOG_CONSOLE_OUTPUT_STREAM", "stdlog", "must be one of stdout, stderr"),
        ("SIGNPATH_API_URL", "signpath", "must be the service's API URL"),
        ("SIGNPATH_CRYPTOKI_DO_NOT_FAIL_ON_READ_WRITE_SESSIONS", "maybe", "must be true or false"),
        ("http_proxy", "ftp://proxy:21", "must be host:port"),
        ("SIGNBRIDGE_CA_BUNDLE", "/nonexistent/ca.pem", "names /nonexistent/ca.pem, which does not exist"),
        ("SIGNBRIDGE_ANCHORS", "/nonexistent/root.pem", "names /nonexistent/root.pem"),
        ("SIGNBRIDGE_TIMESTAMP_URL", "tsa", "must be a timestamp authority URL"),
    ],
)
def test_environment_errors_name_the_variable(tmp_path: Path, variable: str, value: str, expected: str) -> None:
    message = config_error(tmp_path, environ={variable: value, "SIGNPATH_API_TOKEN": TOKEN})
    assert message.startswith(f"environment variable {variable} ")
    assert expected in message


def test_command_line_errors_name_the_flag(tmp_path: Path) -> None:
    message = config_error(tmp_path, cli={"service_unavailable_timeout": -1, "api_token": TOKEN})
    assert message == "--service-unavailable-timeout must not be negative (got -1)"
    message = config_error(tmp_path, cli={"organization_id": "x"}, environ={"SIGNPATH_API_TOKEN": TOKEN})
    assert message.startswith("--organization-id must be a GUID")


def test_file_errors_are_found_even_when_overridden(tmp_path: Path) -> None:
    message = config_error(tmp_path, {"ApiToken": TOKEN, "HttpRequestTimeoutInSeconds": -5},
                           environ={"SIGNPATH_HTTP_REQUEST_TIMEOUT_IN_SECONDS": "10"})
    assert "config.json: HttpRequestTimeoutInSeconds must not be negative" in message


def test_unrelated_command_line_options_are_ignored(tmp_path: Path) -> None:
    settings = load(tmp_path, cli={"foreground": True, "socket": "/run/x", "project_slug": None, "trust_anchors": ()})
    assert settings.project_slug is None and settings.trust_anchors == ()


# ---- showing settings ---------------------------------------------------------------------------


def test_redacted_and_repr_never_show_secrets(tmp_path: Path) -> None:
    settings = load(tmp_path, environ={
        "SIGNPATH_API_TOKEN": TOKEN,
        "SIGNPATH_ORGANIZATION_ID": ORG,
        "http_proxy": "http://builder:proxy-secret-77@proxy.corp:3128",
    })
    shown = settings.redacted()
    assert shown["api_token"] == "***"
    assert shown["organization_id"] == ORG
    assert shown["http_proxy"] == "http://builder:***@proxy.corp:3128"
    assert settings.http_proxy == "http://builder:proxy-secret-77@proxy.corp:3128"
    json.dumps(shown)  # plain data
    for text in (repr(settings), str(settings), json.dumps(shown), repr(settings.sources)):
        assert TOKEN not in text and "proxy-secret-77" not in text
    assert set(settings.secrets()) == {TOKEN, f"{ORG}:{TOKEN}", "proxy-secret-77"}
    assert load(tmp_path).redacted()["api_token"] is None


def test_require_connection_settings_lists_everything_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        require_connection_settings(load(tmp_path))
    message = str(caught.value)
    for text in ("OrganizationId: pass --organization-id, set SIGNPATH_ORGANIZATION_ID",
                 "ApiToken: pass --api-token, set SIGNPATH_API_TOKEN",
                 '"ApiToken" in a config file (--config or SIGNPATH_CONFIG_FILE)'):
        assert text in message

    path = write_config(tmp_path / "conf", {"OrganizationId": ORG})
    with pytest.raises(ConfigError) as caught:
        require_connection_settings(load(tmp_path, cli={"config": path}))
    message = str(caught.value)
    assert "OrganizationId" not in message
    assert f'ApiToken: pass --api-token, set SIGNPATH_API_TOKEN, or put "ApiToken" in {path}' in message

    require_connection_settings(load(tmp_path, cli={"config": path, "api_token": TOKEN}))


def test_parse_pin() -> None:
    assert parse_pin("CONFIG") is None
    assert parse_pin(f"{ORG.upper()}:{TOKEN}") == (ORG, TOKEN)
    with pytest.raises(ConfigError) as caught:
        parse_pin(TOKEN)
    assert TOKEN not in str(caught.value) and "CONFIG or $OrganizationId:$ApiToken" in str(caught.value)
    with pytest.raises(ConfigError, match="no API token"):
        parse_pin(f"{ORG}:")


def test_default_log_directory() -> None:
    if "XDG_STATE_HOME" in os.environ:
        assert default_log_directory(os.environ, "linux") == Path(platformdirs.user_log_dir("signbridge"))
    assert default_log_directory({}, "linux") == Path.home() / ".local" / "state" / "signbridge" / "log"
    assert default_log_directory({"XDG_STATE_HOME": "/srv/state"}, "linux") == Path("/srv/state/signbridge/log")
    assert default_log_directory({"XDG_STATE_HOME": "relative"}, "linux") == default_log_directory({}, "linux")
    assert default_log_directory({}, "darwin") == Path(MacOS("SignBridge").user_log_dir)
    if sys.platform == "linux" and "XDG_STATE_HOME" not in os.environ:
        assert default_log_directory() == Path(platformdirs.user_log_dir("signbridge"))
