"""``signbridge start|status|stop|restart`` against a real signing service on loopback.

Each test starts real token processes with real p11-kit registrations (``/etc/pkcs11/modules`` as
root, the user's module directory otherwise) and removes them all when it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import require_tool, run
from providerkit import PROXY_MODULE, Provider
from servicekit import DemoService, demo_service
from signbridge import p11kit
from signbridge.provider import registration
from signbridge.server.process import free_port

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    with demo_service(tmp_path_factory.mktemp("svc")) as svc:
        yield svc


@pytest.fixture
def provider(service: DemoService):
    provider = Provider.for_service(service)
    yield provider
    provider.cleanup()


DEMO_KEY_IDS = ["demo/ecdsa-signing", "demo/installer-signing", "demo/release-signing"]


def assert_one_line_failure(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("signbridge: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]


def assert_nothing_left(provider: Provider) -> None:
    assert provider.records() == []
    assert provider.our_module_files() == []
    tokens = provider.runtime / "run" / "tokens"
    assert not tokens.exists() or list(tokens.iterdir()) == []


# --- start, status, stop ------------------------------------------------------------------------


def test_start_is_ready_when_it_returns_then_status_and_stop(provider: Provider, service: DemoService) -> None:
    started = time.monotonic()
    proc = provider.start()
    assert time.monotonic() - started < 30
    record = provider.record()
    name = f"signbridge-{service.org[:8]}"
    assert record.name == name and record.identities == 3
    assert list(record.key_ids) == DEMO_KEY_IDS
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        f"Token {name} is ready: 3 identities from {service.api_url} "
        f"(organization {service.org}, process {record.pid})"
    )
    assert lines[1:4] == [f"  {key_id}" for key_id in DEMO_KEY_IDS]
    module_file = registration.module_dir() / f"{name}.module"
    assert f"Registered with p11-kit: {module_file}" in lines
    assert f"  export P11_KIT_SERVER_ADDRESS=unix:path={record.socket}" in lines
    assert any("--module /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so" in line for line in lines)
    assert lines[-1] == f"Stop it with: signbridge stop {name}"

    # Ready means: socket listening (private), module file written, record written.
    socket_path = Path(record.socket)
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    fields = p11kit.read_fields(module_file)
    assert fields["remote"] == f"unix:path={record.socket}"
    assert stat.S_IMODE(module_file.stat().st_mode) == 0o644
    require_tool("p11-kit")
    listing = run(["p11-kit", "list-modules"]).stdout.decode()
    assert f"{name}:" in listing and f"token: {name}" in listing
    # Other users' p11-kit keeps working (it cannot reach root's token, and must not fail on it).
    require_tool("runuser")
    others = run(["runuser", "-u", "nobody", "--", "env", "HOME=/nonexistent", "p11-kit", "list-modules"])
    assert f"{name}:" in others.stdout.decode() and f"token: {name}" not in others.stdout.decode()

    status = provider.status()
    assert [token["name"] for token in status["tokens"]] == [name]
    assert status["tokens"][0]["state"] == "running"
    assert status["tokens"][0]["key_ids"] == DEMO_KEY_IDS
    assert status["tokens"][0]["server_address"] == f"unix:path={record.socket}"
    assert status["stale"] == []
    human = provider.run("status")
    assert human.returncode == 0
    assert f"{name}: running, process {record.pid}" in human.stdout
    assert "identities: 3" in human.stdout

    stopped = provider.run("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"Stopped {name} (process {record.pid})"
    assert not module_file.exists()
    assert_nothing_left(provider)
    assert not os.path.exists(f"/proc/{record.pid}") or _zombie(record.pid)
    assert provider.status()["tokens"] == []
    assert "No token is running" in provider.run("status").stdout


def _zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"


def test_a_second_start_reports_the_running_token(provider: Provider) -> None:
    provider.start()
    first = provider.record()
    again = provider.start()
    assert "is already running" in again.stdout.splitlines()[0]
    assert provider.record().pid == first.pid


def test_the_api_token_is_never_in_argv_environment_or_files(provider: Provider, service: DemoService) -> None:
    # The token given on the command line, the way SignPath's macOS app takes it.
    provider.start("--api-token", service.token, SIGNPATH_API_TOKEN=None)  # type: ignore[arg-type]
    record = provider.record()
    secret = service.token.encode()
    assert secret not in Path(f"/proc/{record.pid}/cmdline").read_bytes()
    assert secret not in Path(f"/proc/{record.pid}/environ").read_bytes()
    ps = run(["ps", "-ww", "-o", "args=", "-p", str(record.pid)]).stdout
    assert b"signbridge.provider" in ps and secret not in ps
    for path in [*provider.runtime.rglob("*"), *provider.our_module_files()]:
        if path.is_file():
            assert secret not in path.read_bytes(), path
    assert provider.log_file.exists() and secret not in provider.log_file.read_bytes()


def test_foreground_stays_attached_and_cleans_up_on_signals(provider: Provider) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        notify_path = provider.runtime / f"notify-{signum}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(30)
        child = subprocess.Popen(
            [sys.executable, "-m", "signbridge", "start", "--foreground"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=provider.env(NOTIFY_SOCKET=str(notify_path)),
        )  # fmt: skip
        try:
            assert child.stdout is not None
            first = child.stdout.readline()
            assert "is ready: 3 identities" in first, first + (child.stderr.read() if child.poll() else "")
            record = provider.record()
            assert record.pid == child.pid
            assert provider.our_module_files()
            assert notify.recv(256) == f"READY=1\nMAINPID={child.pid}".encode()  # systemd Type=notify
            child.send_signal(signum)
            assert child.wait(timeout=20) == 0
        finally:
            notify.close()
            if child.poll() is None:
                child.kill()
        assert_nothing_left(provider)


# --- start failures: one line, non-zero, nothing left behind ---------------------------------


def test_rejected_token(provider: Provider) -> None:
    proc = provider.run("start", SIGNPATH_API_TOKEN="not-a-valid-token")
    assert_one_line_failure(proc, "rejected the API token (HTTP 401", "The API token is not valid")
    assert proc.returncode == 1
    assert_nothing_left(provider)


def test_user_who_is_not_a_submitter_has_no_certificates(provider: Provider, service: DemoService) -> None:
    service.admin("user", "create", "bystander")
    token = json.loads(service.admin("token", "create", "bystander", "--json").stdout)["apiToken"]
    proc = provider.run("start", SIGNPATH_API_TOKEN=token)
    assert_one_line_failure(proc, "no certificates to load", "not a submitter on any signing policy")
    assert_nothing_left(provider)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--project-slug", "no-such-project"), "There is no project with the slug 'no-such-project'"),
        (("--project-slug", "demo", "--signing-policy-slug", "nope"), "There is no signing policy with the slug 'nope'"),
        (("--signing-policy-slug", "nope"), "There is no signing policy with the slug 'nope'"),
    ],
)
def test_unknown_project_or_policy(provider: Provider, args: tuple[str, ...], fragment: str) -> None:
    proc = provider.run("start", *args)
    assert_one_line_failure(proc, "unknown project or signing policy", fragment, "(check --")
    assert_nothing_left(provider)


def test_unreachable_service_fails_at_the_timeout(provider: Provider) -> None:
    url = f"http://127.0.0.1:{free_port()}/Api"
    started = time.monotonic()
    proc = provider.run("start", "--api-url", url, SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS="2")
    elapsed = time.monotonic() - started
    line = assert_one_line_failure(proc, f"the signing service at {url} is unavailable", "Connection refused")
    assert "ServiceUnavailableTimeoutInSeconds is 2" in line
    assert 2 <= elapsed < 15
    assert_nothing_left(provider)


def test_unwritable_log_directory(provider: Provider, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = provider.run("start", SIGNPATH_LOG_FILE_DIRECTORY=str(blocker / "log"))
    assert_one_line_failure(proc, f"cannot write the log file in {blocker / 'log'}", "Log.File.Directory")
    assert proc.returncode == 2
    assert_nothing_left(provider)


def test_missing_settings_are_listed(provider: Provider) -> None:
    proc = provider.run("start", SIGNPATH_ORGANIZATION_ID="", SIGNPATH_API_TOKEN="")
    assert proc.returncode == 2
    assert "OrganizationId: pass --organization-id, set SIGNPATH_ORGANIZATION_ID" in proc.stderr
    assert "ApiToken: pass --api-token, set SIGNPATH_API_TOKEN" in proc.stderr
    assert_nothing_left(provider)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"ApiUrl": "http://127.0.0.1:1/Api", "ProjectSlugg": "demo"}', 'unknown key "ProjectSlugg"; did you mean ProjectSlug?'),
        ('{"ServiceUnavailableTimeoutInSeconds": "ten"}', 'ServiceUnavailableTimeoutInSeconds must be a number of seconds'),
        ('{"Log": {"Console": {"Level": "loud"}}}', "Log.Console.Level must be one of none, fatal"),
        ('{"ApiUrl": ', "is not valid JSON"),
    ],
)
def test_bad_config_file_names_the_file_and_key(provider: Provider, tmp_path: Path, content: str, fragment: str) -> None:
    config = tmp_path / "provider.json"
    config.write_text(content)
    before = config.read_bytes()
    proc = provider.run("start", "--config", str(config))
    line = assert_one_line_failure(proc, str(config), fragment)
    assert proc.returncode == 2, line
    assert config.read_bytes() == before
    assert_nothing_left(provider)


def test_config_file_settings_are_used(provider: Provider, service: DemoService, tmp_path: Path) -> None:
    config = tmp_path / "provider.json"
    config.write_text(json.dumps({
        "ApiUrl": service.api_url, "OrganizationId": service.org, "ApiToken": service.token,
        "ProjectSlug": "demo", "SigningPolicySlug": "installer-signing",
    }))  # fmt: skip
    provider.start("--config", str(config), SIGNPATH_API_URL="", SIGNPATH_ORGANIZATION_ID="", SIGNPATH_API_TOKEN="")
    assert list(provider.record().key_ids) == ["demo/installer-signing"]


# --- several tokens, ambiguity, reload ------------------------------------------------------------


def test_two_tokens_side_by_side(provider: Provider, service: DemoService) -> None:
    provider.start("--project-slug", "demo", "--signing-policy-slug", "release-signing")
    provider.start("--signing-policy-slug", "ecdsa-signing")
    records = {record.name: record for record in provider.records()}
    assert len(records) == 2
    for name in records:
        assert len(name) <= 32 and name.startswith(f"signbridge-{service.org[:8]}-")
    assert sorted(key for r in records.values() for key in r.key_ids) == ["demo/ecdsa-signing", "demo/release-signing"]
    assert {token["name"] for token in provider.status()["tokens"]} == set(records)
    assert len(provider.our_module_files()) == 2
    require_tool("pkcs11-tool")
    slots = run(["pkcs11-tool", "--module", PROXY_MODULE, "--list-token-slots"]).stdout.decode()
    for name in records:
        assert f"token label        : {name}" in slots

    several = provider.run("stop")
    assert several.returncode == 2 and "several tokens are running" in several.stderr
    first, second = sorted(records)
    assert provider.run("stop", first).returncode == 0
    assert [token["name"] for token in provider.status()["tokens"]] == [second]
    unknown = provider.run("stop", first)
    assert unknown.returncode == 1 and f"no token named {first} is running; running: {second}" in unknown.stderr
    assert provider.run("stop", "--all").returncode == 0
    assert_nothing_left(provider)


def test_ambiguous_reference_names_the_policies_and_the_filter(provider: Provider, service: DemoService) -> None:
    service.admin("policy", "create", "--project", "demo", "--certificate", "developer-id-application", "release-copy")
    service.admin("submitter", "add", "--project", "demo", "--policy", "release-copy", "--user", "demo-ci")
    try:
        proc = provider.run("start")
        line = assert_one_line_failure(
            proc,
            'ambiguous reference: the certificate "Developer ID Application: Demo Corp (DEMOTEAM01)"',
            "used by the signing policies demo/release-copy, demo/release-signing",
            "load one of them with --signing-policy-slug release-copy or --signing-policy-slug release-signing",
        )
        assert proc.returncode == 2, line
        assert_nothing_left(provider)
        provider.start("--signing-policy-slug", "release-signing")
        assert list(provider.record().key_ids) == ["demo/release-signing"]
    finally:
        service.admin("submitter", "remove", "--project", "demo", "--policy", "release-copy", "--user", "demo-ci")


def test_restart_reloads_certificates_and_drops_stale_registrations(
    provider: Provider, service: DemoService
) -> None:
    provider.start("--project-slug", "demo")
    record = provider.record()
    # A token killed with -9: its module file and record stayed behind.
    provider.start("--signing-policy-slug", "ecdsa-signing")
    victim = next(r for r in provider.records() if r.name != record.name)
    os.kill(victim.pid, signal.SIGKILL)
    _wait_gone(victim.pid)

    service.admin("cert", "generate", "extra-key", "--subject", "CN=Extra Signing,O=Demo Corp", "--key-type", "ecdsa-p256")
    service.admin("policy", "create", "--project", "demo", "--certificate", "extra-key", "extra-signing")
    service.admin("submitter", "add", "--project", "demo", "--policy", "extra-signing", "--user", "demo-ci")
    try:
        proc = provider.run("restart")
        assert proc.returncode == 0, proc.stderr
        assert f"Removed the stale token {victim.name} (process {victim.pid} was gone)" in proc.stdout
        assert f"Restarted {record.name}: 4 identities" in proc.stdout
        reloaded = provider.record(record.name)
        assert reloaded.pid == record.pid and reloaded.generation == record.generation + 1
        assert "demo/extra-signing" in reloaded.key_ids
        assert victim.module_file is not None and not Path(victim.module_file).exists()
        assert [r.name for r in provider.records()] == [record.name]
    finally:
        service.admin("submitter", "remove", "--project", "demo", "--policy", "extra-signing", "--user", "demo-ci")


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and not _zombie(pid):
        time.sleep(0.02)


def test_kill_9_leaves_a_stale_registration_that_is_ignored_and_cleaned(provider: Provider) -> None:
    provider.start()
    record = provider.record()
    os.kill(record.pid, signal.SIGKILL)
    _wait_gone(record.pid)
    assert record.module_file is not None and Path(record.module_file).exists()

    status = provider.status()
    assert status["tokens"] == []
    assert [token["name"] for token in status["stale"]] == [record.name]
    assert status["stale_module_files"] == [record.module_file]
    assert "Stale, ignored" in provider.run("status").stdout
    # Consumers going through p11-kit-proxy see no token, and no error.
    slots = run(["pkcs11-tool", "--module", PROXY_MODULE, "--list-token-slots"]).stdout.decode()
    assert record.name not in slots

    provider.start()
    fresh = provider.record()
    assert fresh.pid != record.pid
    assert Path(fresh.module_file or "").exists()
    assert p11kit.read_fields(Path(fresh.module_file or ""))["x-signbridge-pid"] == str(fresh.pid)
    assert provider.status()["stale"] == []


def test_restart_keeps_serving_when_the_service_is_down(provider: Provider, service: DemoService) -> None:
    provider.start(SIGNPATH_SERVICE_UNAVAILABLE_TIMEOUT_IN_SECONDS="1")
    record = provider.record()
    service.process.stop()
    try:
        proc = provider.run("restart", "--wait", "30")
    finally:
        service.process.start()
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"signbridge: error: {record.name} kept its previous certificates: ")
    assert "is unavailable" in proc.stderr
    after = provider.record()
    assert after.pid == record.pid and after.generation == 1 and list(after.key_ids) == DEMO_KEY_IDS
    assert after.last_error is not None and "is unavailable" in after.last_error
    assert [token["name"] for token in provider.status()["tokens"]] == [record.name]
    assert "last reload failed" in provider.run("status").stdout


def test_a_signal_taken_by_another_thread_wakes_the_token_at_once() -> None:
    """The kernel may hand SIGTERM or SIGHUP to any thread (the token serves PKCS#11 from others);
    the main thread must wake for it, not at its next timeout (``signbridge stop`` took 5 s)."""
    probe = (
        "import signal, threading, time\n"
        "from signbridge.provider.daemon import _Signals\n"
        "signals = _Signals()\n"
        "signals.install()\n"
        "signals.busy = False\n"
        "ready = threading.Event()\n"
        "def serve():\n"
        "    ready.set()\n"
        "    time.sleep(120)\n"
        "worker = threading.Thread(target=serve, daemon=True)\n"
        "worker.start()\n"
        "ready.wait()\n"
        "for number, flag in ((signal.SIGHUP, signals.reload), (signal.SIGTERM, signals.stop)):\n"
        "    threading.Timer(0.2, signal.pthread_kill, (worker.ident, number)).start()\n"
        "    started = time.monotonic()\n"
        "    while not flag.is_set():\n"
        "        signals.wait(timeout=60)\n"
        "    print(signal.Signals(number).name, round(time.monotonic() - started, 1))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=150, check=True)
    woken = dict(line.split() for line in result.stdout.splitlines())
    assert set(woken) == {"SIGHUP", "SIGTERM"}, result.stdout
    assert all(float(seconds) < 30 for seconds in woken.values()), woken  # the signal, not the 60 s timeout
