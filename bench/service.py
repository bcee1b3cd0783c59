"""SignHash throughput and latency over loopback, next to the raw RSA-2048 sign rate of the same key.

    ./dev bench service [--workers N] [--seconds S] [--clients 1,8,32] [--slices K]

Starts a demo service with N worker processes (default: one per core but one, which wrk uses), then,
for 1, 8 and 32 concurrent keep-alive connections (wrk, one thread), alternates K slices of the raw
sign rate of the release-signing key in N processes with K slices of SignHash driven by wrk, S/K
seconds each, and prints throughput, p50/p99 latency and the ratio to the raw rate. Alternating the
two keeps a machine whose speed drifts (other work on it) from favouring either side of the ratio.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import Scheme, SignatureRequest
from signbridge.server.keystores import KeyRef
from signbridge.server.keystores.software import SoftwareKeystore
from signbridge.server.process import ServiceProcess

TARGET_RATIO = 0.75
TARGET_P99_MS = 50


def raw_sign_worker(connection: Connection, data_dir: str, key_ref: str) -> None:
    """Signs in a loop for as many seconds as it is sent, and answers the count, until sent None."""
    keystore = SoftwareKeystore(Path(data_dir))
    ref = KeyRef.parse(key_ref)
    request = SignatureRequest(bytes(32), HashAlgorithm.SHA256, Scheme.RSA_PKCS1)
    keystore.sign(ref, request)  # load and cache the key, as the service does
    while (seconds := connection.recv()) is not None:
        count, deadline = 0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            keystore.sign(ref, request)
            count += 1
        connection.send(count)


class RawSigners:
    """``processes`` processes signing with the key, each only while :meth:`rate` measures."""

    def __init__(self, data_dir: Path, key_ref: str, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections: list[Connection] = []
        self.processes = []
        for _ in range(processes):
            ours, theirs = context.Pipe()
            process = context.Process(target=raw_sign_worker, args=(theirs, str(data_dir), key_ref), daemon=True)
            process.start()
            self.connections.append(ours)
            self.processes.append(process)

    def count(self, seconds: float) -> int:
        """Signatures made by all processes together in ``seconds``."""
        for connection in self.connections:
            connection.send(seconds)
        return sum(connection.recv() for connection in self.connections)

    def close(self) -> None:
        for connection in self.connections:
            connection.send(None)
        for process in self.processes:
            process.join()


def wrk_script(directory: Path, organization: str, token: str, count: int = 64) -> Path:
    """A wrk Lua script that posts SignHash requests with ``count`` different digests and prints
    the exact numbers the table needs."""
    bodies = []
    for i in range(count):
        body = json.dumps({
            "projectSlug": "demo",
            "signingPolicySlug": "release-signing",
            "hashSigningData": {
                "hash": base64.b64encode(HashAlgorithm.SHA256.digest(i.to_bytes(4, "big"))).decode(),
                "signatureAlgorithm": "Rsa",
                "rsaOptions": {"hashAlgorithmName": "Sha256", "paddingMode": "Pkcs1"},
            },
        })
        bodies.append("[[" + body + "]]")
    script = directory / "signhash.lua"
    script.write_text(
        f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
local bodies = {{{", ".join(bodies)}}}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/Api/v1/{organization}/SigningRequests/SignHash", nil, bodies[i % #bodies + 1])
end
local failed = 0
response = function(status, headers, body)
  if status ~= 200 then failed = failed + 1 end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests,
    e.connect + e.read + e.write + e.timeout + e.status, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""
    )
    return script


def drive(url: str, script: Path, clients: int, seconds: float) -> tuple[int, int, float, float, float]:
    """Runs wrk (one thread, ``clients`` keep-alive connections); returns requests, errors, seconds, p50 and p99 in ms."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench/service.py needs wrk (Debian package wrk); `./dev bench service` installs it")
    out = subprocess.run(
        [wrk, "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script), url],
        check=True, capture_output=True, text=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    requests, errors, duration_us, p50_us, p99_us = (int(v) for v in line.split()[1:])
    return requests, errors, duration_us / 1e6, p50_us / 1000, p99_us / 1000


@dataclass
class Row:
    clients: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    signatures: int = 0  # raw, in the slices between the service's
    raw_seconds: float = 0.0
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def raw(self) -> float:
        return self.signatures / self.raw_seconds

    @property
    def ratio(self) -> float:
        return self.throughput / self.raw

    @property
    def p99(self) -> float:
        """The worst slice's p99 (wrk reports percentiles per run)."""
        return max(self.p99s)


def measure(url: str, script: Path, raw: RawSigners, clients: int, seconds: float, slices: int) -> Row:
    """Alternates raw and service slices; the first wrk second warms the connections up and is not counted."""
    drive(url, script, clients, 1)
    row = Row(clients)
    for _ in range(slices):
        row.signatures += raw.count(seconds / slices)
        row.raw_seconds += seconds / slices
        count, errors, elapsed, p50, p99 = drive(url, script, clients, seconds / slices)
        row.requests, row.errors, row.seconds = row.requests + count, row.errors + errors, row.seconds + elapsed
        row.p50s.append(p50)
        row.p99s.append(p99)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # One core is left to the load generator, which on a real deployment runs on other machines.
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--slices", type=int, default=5, help="raw and service slices per row, alternating")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="signbridge-bench-") as temporary:
        data_dir = Path(temporary) / "data"
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "signbridge", "server", "init", "--demo", "--json", "--data-dir", str(data_dir)],
            check=True, capture_output=True, text=True,
        ).stdout)
        with sqlite3.connect(data_dir / "signbridge.db") as db:
            (key_ref,) = db.execute(
                "SELECT c.key_ref FROM certificates c JOIN signing_policies p ON p.certificate_id = c.id "
                "WHERE p.slug = 'release-signing'"
            ).fetchone()

        script = wrk_script(Path(temporary), info["organizationId"], info["apiToken"])
        raw = RawSigners(data_dir, key_ref, args.workers)
        load_before = os.getloadavg()
        try:
            with ServiceProcess(data_dir, workers=args.workers) as service:
                url = service.api_url.removesuffix("/Api")
                rows = [measure(url, script, raw, int(c), args.seconds, args.slices) for c in args.clients.split(",")]
        finally:
            raw.close()
        load_after = os.getloadavg()

    print(f"RSA-2048 SignHash over loopback; service: {args.workers} worker(s); load: wrk, one thread; "
          f"{args.seconds:g} s per row in {args.slices} slices; {os.cpu_count()} CPU core(s) shared by the service and wrk")
    print(f"reference: the raw RSA-2048 sign rate of the same key in {args.workers} process(es), "
          f"measured in slices alternating with the service's")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print()
    print(f"{'clients':>7}  {'requests':>8}  {'errors':>6}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'raw/s':>8}  {'ratio':>6}")
    for row in rows:
        print(f"{row.clients:>7}  {row.requests:>8}  {row.errors:>6}  {row.throughput:>8,.0f}  "
              f"{statistics.median(row.p50s):>7.2f}  {row.p99:>7.2f}  {row.raw:>8,.0f}  {row.ratio:>6.2f}")
    last = rows[-1]
    target = last.ratio >= TARGET_RATIO and last.p99 < TARGET_P99_MS and last.errors == 0
    print()
    print(f"target at {last.clients} clients (ratio >= {TARGET_RATIO:.2f}, p99 < {TARGET_P99_MS} ms, no errors): "
          f"{'met' if target else 'NOT met'}")
    return 0 if target else 1


if __name__ == "__main__":
    sys.exit(main())
