"""deploy/: the systemd unit passes systemd-analyze verify; the container's entry point starts the
service (created on first start) as the image would. No image is built here: only what runs here."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, require_tool
from signbridge.server.process import free_port

DEPLOY = ROOT / "deploy"
SIGNBRIDGE = Path(sys.executable).parent / "signbridge"


def test_systemd_unit_and_its_postgresql_drop_in_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # The unit names the program where the install steps put it; here it is in the virtualenv.
    unit = (DEPLOY / "systemd" / "signbridge.service").read_text()
    assert "ExecStart=/opt/signbridge/bin/signbridge server run" in unit
    (tmp_path / "signbridge.service").write_text(unit.replace("/opt/signbridge/bin/signbridge", str(SIGNBRIDGE)))
    drop_ins = tmp_path / "signbridge.service.d"
    drop_ins.mkdir()
    (drop_ins / "postgresql.conf").write_text((DEPLOY / "systemd" / "signbridge.service.d" / "postgresql.conf").read_text())
    proc = subprocess.run([analyze, "verify", str(tmp_path / "signbridge.service")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
    # The check is real: a key systemd does not know is reported.
    (drop_ins / "postgresql.conf").write_text("[Service]\nNoSuchSetting=1\n")
    proc = subprocess.run([analyze, "verify", str(tmp_path / "signbridge.service")], capture_output=True, text=True)
    assert "Unknown key 'NoSuchSetting'" in proc.stderr


def test_containerfile_copies_what_the_repository_has() -> None:
    containerfile = (DEPLOY / "container" / "Containerfile").read_text()
    sources = [part for line in re.findall(r"^COPY (.+)$", containerfile, re.M) for part in line.split()[:-1]]
    assert sources and all((ROOT / source).exists() for source in sources), sources
    assert os.access(DEPLOY / "container" / "entrypoint.sh", os.X_OK)


@pytest.mark.timeout(120)
def test_container_entry_point_creates_the_data_directory_and_serves(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    data_dir = tmp_path / "volume"
    env = {
        **os.environ, "PATH": f"{SIGNBRIDGE.parent}{os.pathsep}{os.environ['PATH']}", "SIGNBRIDGE_DATA_DIR": str(data_dir),
        "SIGNBRIDGE_HOST": "127.0.0.1", "SIGNBRIDGE_PORT": str(port), "SIGNBRIDGE_WORKERS": "1",
        "SIGNBRIDGE_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}", "SIGNBRIDGE_INIT_DEMO": "1",
    }
    log = (tmp_path / "container.log").open("wb")
    process = subprocess.Popen(["sh", str(DEPLOY / "container" / "entrypoint.sh")], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{metrics_port}/Api/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "container.log").read_text()
            time.sleep(0.2)
        assert (data_dir / "server.json").is_file() and (data_dir / "master.key").is_file()
        assert httpx.get(f"http://127.0.0.1:{port}/Api/healthz").text == "Healthy"
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/Api/metrics").text
        names = {family.name for family in text_string_to_metric_families(scraped)}
        assert {"signbridge_http_request_duration_seconds", "signbridge_audit_commit_seconds"} <= names
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(40)
        log.close()
    lines = (tmp_path / "container.log").read_text().splitlines()
    assert any(line.startswith('{"time"') for line in lines)  # the service logs JSON lines
