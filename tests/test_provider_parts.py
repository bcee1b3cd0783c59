"""The provider's parts on their own: token names, where p11-kit registrations go, the settings pipe,
the ambiguous-reference rule."""

from __future__ import annotations

import datetime
import os
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signbridge import p11kit
from signbridge.api.client import SigningPolicyInfo
from signbridge.errors import UsageError
from signbridge.provider import registration
from signbridge.provider.daemon import settings_from_wire, settings_to_wire
from signbridge.provider.loader import AmbiguousReference, check_unambiguous
from signbridge.provider.naming import check_name, token_name
from signbridge.provider.settings import load_settings

ORG = "0a1b2c3d-0000-4000-8000-00000000abcd"
OTHER_ORG = "0a1b2c3d-1111-4000-8000-00000000abcd"


# --- names ------------------------------------------------------------------------------------


def test_token_names_follow_organization_and_filters() -> None:
    assert token_name(ORG, None, None) == "signbridge-0a1b2c3d"
    assert token_name(ORG, "demo", None) == "signbridge-0a1b2c3d-demo"
    assert token_name(ORG, "demo", "ci") == "signbridge-0a1b2c3d-demo-ci"
    assert token_name(ORG, None, "ci") == "signbridge-0a1b2c3d--ci"


def test_long_names_are_cut_to_the_pkcs11_label_and_stay_distinct() -> None:
    names = {
        token_name(ORG, "demo", "release-signing"),
        token_name(ORG, "demo", "release-signing-2"),
        token_name(ORG, "demo-x", "release-signing"),
        token_name(OTHER_ORG, "demo", "release-signing"),
        token_name(ORG, None, "a-very-long-policy-slug-indeed"),
    }
    assert len(names) == 5
    for name in names:
        assert len(name.encode()) <= 32 and name.startswith("signbridge-0a1b2c3d-")
        assert check_name(name) == name
    assert token_name(ORG, "demo", "release-signing") == token_name(ORG, "demo", "release-signing")


@pytest.mark.parametrize("bad", ["", "-leading-dash", "has space", "slash/y", "x" * 33, "ünïcode"])
def test_given_names_are_checked(bad: str) -> None:
    with pytest.raises(UsageError, match="cannot name a token"):
        check_name(bad)


# --- where registrations go -------------------------------------------------------------------


def test_module_directory_for_root_and_for_users() -> None:
    assert registration.module_dir({}, uid=0) == Path("/etc/pkcs11/modules")
    assert registration.module_dir({"HOME": "/home/ann"}, uid=1000) == Path("/home/ann/.config/pkcs11/modules")
    assert registration.module_dir({"HOME": "/home/ann", "XDG_CONFIG_HOME": "/cfg"}, uid=1000) == Path(
        "/cfg/pkcs11/modules"
    )
    assert registration.module_dir({"SIGNBRIDGE_P11KIT_MODULE_DIR": "/x"}, uid=0) == Path("/x")


def test_reasons_p11_kit_would_skip_the_user_directory(tmp_path: Path) -> None:
    assert registration.user_config_ignored({"HOME": str(tmp_path)}, uid=0) is None  # root: the system dir
    assert registration.user_config_ignored({"HOME": str(tmp_path)}, uid=1000) is None
    assert registration.user_config_ignored({"HOME": str(tmp_path), "P11_KIT_NO_USER_CONFIG": "1"}, uid=1000) == (
        "P11_KIT_NO_USER_CONFIG is set"
    )
    config = tmp_path / ".config" / "pkcs11"
    config.mkdir(parents=True)
    (config / "pkcs11.conf").write_text("# mine\nuser-config: none\n")
    assert registration.user_config_ignored({"HOME": str(tmp_path)}, uid=1000) == (
        f"{config / 'pkcs11.conf'} says user-config: none"
    )


def test_remote_address_is_percent_encoded() -> None:
    assert p11kit.remote_address("/run/user/1000/a b%/p.sock") == "unix:path=/run/user/1000/a%20b%25/p.sock"
    fields = {"remote": p11kit.remote_address("/tmp/a b/p.sock")}
    assert p11kit.socket_of(fields) == "/tmp/a b/p.sock"


def test_module_files_are_readable_by_everyone_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "etc" / "pkcs11" / "modules"
    previous = os.umask(0o077)
    try:
        path = registration.register("signbridge-unit", "/tmp/nowhere/p.sock", 4242, directory=directory)
    finally:
        os.umask(previous)
    assert path == directory / "signbridge-unit.module"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    for created in (directory, directory.parent, directory.parent.parent):
        assert stat.S_IMODE(created.stat().st_mode) == 0o755
    fields = p11kit.read_fields(path)
    assert fields == {
        "remote": "unix:path=/tmp/nowhere/p.sock", "critical": "no",
        "x-signbridge-token": "signbridge-unit", "x-signbridge-pid": "4242",
    }  # fmt: skip
    assert list(directory.parent.glob(".*tmp")) == []
    assert registration.module_file_name("ci") == "signbridge-ci.module"


def test_orphan_module_files_are_removed_only_when_their_token_is_gone(tmp_path: Path) -> None:
    directory = tmp_path / "modules"
    live_socket = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live_socket))
    listener.listen(8)
    try:
        live = registration.register("signbridge-live", live_socket, os.getpid(), directory=directory)
        dead_socket = registration.register("signbridge-dead", tmp_path / "dead.sock", os.getpid(), directory=directory)
        dead_pid = registration.register("signbridge-gone", live_socket, 2**22 + 1, directory=directory)
        foreign = directory / "signbridge-foreign.module"
        foreign.write_text("module: /usr/lib/x86_64-linux-gnu/pkcs11/opensc-pkcs11.so\n")
        removed = registration.remove_orphans(directory)
    finally:
        listener.close()
    assert sorted(removed) == sorted([dead_socket, dead_pid])
    assert live.exists() and foreign.exists()


# --- the settings pipe and the ambiguous-reference rule -------------------------------------------


def test_settings_survive_the_pipe_to_the_token_process(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-")
    settings = load_settings(
        cli={"project_slug": "demo"},
        environ={
            "SIGNPATH_API_URL": "http://127.0.0.1:1/Api", "SIGNPATH_ORGANIZATION_ID": ORG,
            "SIGNPATH_API_TOKEN": "secret-token-value", "SIGNBRIDGE_CA_BUNDLE": str(bundle),
            "SIGNPATH_LOG_FILE_DIRECTORY": str(tmp_path / "log"), "http_proxy": "proxy:3128",
            "SIGNBRIDGE_ANCHORS": str(bundle), "SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS": "7",
        },
    )  # fmt: skip
    again = settings_from_wire(settings_to_wire(settings))
    assert again == settings
    assert again.api_token == "secret-token-value" and again.ca_bundle == bundle
    assert again.sources == settings.sources


def _certificate(name: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip


def _policy(project: str, slug: str, certificate: x509.Certificate) -> SigningPolicyInfo:
    return SigningPolicyInfo(project, slug, f"{project}-{slug}", certificate, (), "Ecdsa", 256)


def test_ambiguous_references_name_the_filter_that_resolves_them() -> None:
    shared = _certificate("Shared Signing")
    policies = [_policy("app", "release", shared), _policy("lib", "release", shared),
                _policy("app", "nightly", _certificate("Other"))]  # fmt: skip
    with pytest.raises(AmbiguousReference) as across_projects:
        check_unambiguous(policies, None, None)
    message = str(across_projects.value)
    assert message.startswith('ambiguous reference: the certificate "Shared Signing" (SHA-1 ')
    assert "used by the signing policies app/release, lib/release" in message
    assert message.endswith("load one of them with --project-slug app or --project-slug lib")

    within = [_policy("app", "release", shared), _policy("app", "hotfix", shared)]
    with pytest.raises(AmbiguousReference, match="--signing-policy-slug release or --signing-policy-slug hotfix$"):
        check_unambiguous(within, "app", None)
    check_unambiguous([policies[0], policies[2]], None, None)  # distinct certificates are fine
