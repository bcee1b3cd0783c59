"""The service's helper processes, the audit writer and the key signer: they outlive signals sent to
the service's group, not the service itself; a writer that dies costs the service one answer, never
a signature without its record, and a key signer that dies is replaced by the next request."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from servicekit import DemoService, SigningLoad, demo_service, init_demo, signbridge
from signbridge.server.process import ServiceProcess

H32 = base64.b64encode(bytes(32)).decode()
RSA = {"hash": H32, "signatureAlgorithm": "Rsa", "rsaOptions": {"hashAlgorithmName": "Sha256"}}


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return children


def _child_pid(service_pid: int, module: str) -> int:
    for child in _children(service_pid):
        if f"signbridge.server.{module}".encode() in Path(f"/proc/{child}/cmdline").read_bytes():
            return child
    raise AssertionError(f"the service (pid {service_pid}) has no {module} child")


def _writer_pid(service_pid: int) -> int:
    return _child_pid(service_pid, "audit_writer")


def _signer_pid(service_pid: int) -> int:
    return _child_pid(service_pid, "key_signer")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _records(svc: DemoService) -> list[dict]:
    return json.loads(svc.admin("audit", "list", "--json", "--limit", "1000000").stdout)


@pytest.fixture
def svc(tmp_path: Path):
    with demo_service(tmp_path) as service:
        yield service


def test_writer_command_line_holds_no_database_url(svc: DemoService) -> None:
    assert svc.sign_hash("release-signing", RSA).status_code == 200
    writer = _writer_pid(svc.process.process.pid)  # type: ignore[union-attr]
    arguments = Path(f"/proc/{writer}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert arguments[-3:-1] == [b"-m", b"signbridge.server.audit_writer"] and arguments[-1].isdigit()
    assert not any(b"sqlite" in arg or b"postgresql" in arg for arg in arguments)


def test_a_killed_writer_costs_one_answer_and_is_replaced(svc: DemoService) -> None:
    first = svc.sign_hash("release-signing", RSA)
    assert first.status_code == 200
    writer = _writer_pid(svc.process.process.pid)  # type: ignore[union-attr]
    os.kill(writer, signal.SIGKILL)
    assert _wait_gone(writer)

    lost = svc.sign_hash("release-signing", RSA)
    assert lost.status_code == 503
    assert lost.headers["content-type"] == "application/problem+json"
    assert "signature was not released" in lost.json()["detail"]
    assert "signature" not in json.dumps(lost.json()).replace("signature was not released", "")

    after = [svc.sign_hash("release-signing", RSA) for _ in range(3)]
    assert [r.status_code for r in after] == [200, 200, 200]
    assert _writer_pid(svc.process.process.pid) != writer  # type: ignore[union-attr]
    assert "audit writer process stopped" in svc.log_text()

    granted = {r["request_id"] for r in _records(svc) if r["outcome"] == "granted"}
    assert granted == {first.json()["signingRequestId"], *(r.json()["signingRequestId"] for r in after)}
    assert "intact" in svc.admin("audit", "verify").stdout


def test_a_killed_key_signer_is_replaced_and_every_answer_is_audited(svc: DemoService) -> None:
    assert svc.sign_hash("release-signing", RSA).status_code == 200
    signer = _signer_pid(svc.process.process.pid)  # type: ignore[union-attr]
    os.kill(signer, signal.SIGKILL)
    assert _wait_gone(signer)

    after = [svc.sign_hash("release-signing", RSA) for _ in range(4)]
    statuses = [r.status_code for r in after]
    # A request sent before the service saw the signer go is answered 503; the next starts a new signer.
    assert statuses[1:] == [200, 200, 200] and statuses[0] in (200, 503)
    assert _signer_pid(svc.process.process.pid) != signer  # type: ignore[union-attr]
    records = _records(svc)
    assert sum(r["outcome"] == "granted" for r in records) == 1 + statuses.count(200)
    assert sum(r["outcome"] == "failed" for r in records) == statuses.count(503)
    assert "intact" in svc.admin("audit", "verify").stdout


def test_writer_exits_with_a_killed_service(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    info = init_demo(data_dir)
    process = ServiceProcess(data_dir).start()
    try:
        response = httpx.post(
            f"{process.api_url}/v1/{info['organizationId']}/SigningRequests/SignHash",
            json={"projectSlug": "demo", "signingPolicySlug": "release-signing", "hashSigningData": RSA},
            headers={"Authorization": f"Bearer {info['apiToken']}"},
        )
        assert response.status_code == 200
        writer = _writer_pid(process.process.pid)  # type: ignore[union-attr]
        signer = _signer_pid(process.process.pid)  # type: ignore[union-attr]
        os.kill(process.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        process.process.wait(10)  # type: ignore[union-attr]
        assert _wait_gone(writer), "the audit writer outlived its service"
        assert _wait_gone(signer), "the key signer outlived its service"
    finally:
        process.stop()
    assert "intact" in signbridge("admin", "--data-dir", str(data_dir), "audit", "verify").stdout


def test_ctrl_c_to_the_process_group_loses_no_record(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the service and its writer at once; the writer must outlast the
    service's graceful shutdown."""
    data_dir = tmp_path / "data"
    info = init_demo(data_dir)
    process = ServiceProcess(data_dir).start()
    with SigningLoad(process, info) as load:
        time.sleep(1.5)
        writer = _writer_pid(process.process.pid)  # type: ignore[union-attr]
        signer = _signer_pid(process.process.pid)  # type: ignore[union-attr]
        os.killpg(process.process.pid, signal.SIGINT)  # type: ignore[union-attr]
        code = process.process.wait(30)  # type: ignore[union-attr]
    granted = load.granted
    assert code == 0
    assert _wait_gone(writer) and _wait_gone(signer)
    assert len(granted) > 20
    records = json.loads(signbridge("admin", "--data-dir", str(data_dir), "audit", "list", "--json", "--limit", "1000000").stdout)
    assert set(granted) <= {r["request_id"] for r in records if r["outcome"] == "granted"}
    assert "intact" in signbridge("admin", "--data-dir", str(data_dir), "audit", "verify").stdout
