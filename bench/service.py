"""SignHash throughput and latency over loopback, next to the raw RSA-2048 sign rate of the same key.

    ./dev bench service [--workers N] [--seconds S] [--clients 1,8,32]

Starts a demo service with N worker processes (default: one per core but one, which wrk uses), measures the raw sign rate of
the release-signing key in N processes, then drives SignHash with 1, 8 and 32 concurrent keep-alive
connections (wrk, one thread) and prints throughput, p50/p99 latency and the ratio to the raw rate.
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
from pathlib import Path

from signbridge.hashes import HashAlgorithm
from signbridge.server.keystores import KeyRef
from signbridge.server.keystores.software import SoftwareKeystore
from signbridge.server.process import ServiceProcess
from signbridge.signatures import Scheme, SignatureRequest


def raw_sign_worker(args: tuple[str, str, float]) -> int:
    data_dir, key_ref, seconds = args
    keystore = SoftwareKeystore(Path(data_dir))
    ref = KeyRef.parse(key_ref)
    request = SignatureRequest(bytes(32), HashAlgorithm.SHA256, Scheme.RSA_PKCS1)
    keystore.sign(ref, request)  # load and cache the key, as the service does
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        keystore.sign(ref, request)
        count += 1
    return count


def raw_rate(data_dir: Path, key_ref: str, processes: int, seconds: float) -> float:
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        counts = pool.map(raw_sign_worker, [(str(data_dir), key_ref, seconds)] * processes)
    return sum(counts) / seconds


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
    subprocess.run([wrk, "-t1", f"-c{clients}", "-d1s", "-s", str(script), url], check=True, capture_output=True)  # warm-up
    out = subprocess.run(
        [wrk, "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script), url],
        check=True, capture_output=True, text=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    requests, errors, duration_us, p50_us, p99_us = (int(v) for v in line.split()[1:])
    return requests, errors, duration_us / 1e6, p50_us / 1000, p99_us / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # One core is left to the load generator, which on a real deployment runs on other machines.
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8,32")
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

        raw = raw_rate(data_dir, key_ref, args.workers, args.seconds)
        rows = []
        script = wrk_script(Path(temporary), info["organizationId"], info["apiToken"])
        with ServiceProcess(data_dir, workers=args.workers) as service:
            for clients in (int(c) for c in args.clients.split(",")):
                count, errors, elapsed, p50, p99 = drive(service.api_url.removesuffix("/Api"), script, clients, args.seconds)
                throughput = count / elapsed
                rows.append((clients, count, errors, throughput, p50, p99, throughput / raw))

    print(f"RSA-2048 SignHash over loopback; service: {args.workers} worker(s); load: wrk, one thread; "
          f"{args.seconds:g} s per row; {os.cpu_count()} CPU core(s) shared by the service and wrk")
    print(f"raw RSA-2048 sign rate of the same key, {args.workers} process(es): {raw:,.0f} signatures/s")
    print()
    print(f"{'clients':>7}  {'requests':>8}  {'errors':>6}  {'req/s':>8}  {'p50 ms':>7}  {'p99 ms':>7}  {'raw/s':>8}  {'ratio':>6}")
    for clients, count, errors, throughput, p50, p99, ratio in rows:
        print(f"{clients:>7}  {count:>8}  {errors:>6}  {throughput:>8,.0f}  {p50:>7.2f}  {p99:>7.2f}  {raw:>8,.0f}  {ratio:>6.2f}")
    last = rows[-1]
    target = last[6] >= 0.5 and last[5] < 50 and last[2] == 0
    print()
    print(f"target at {last[0]} clients (ratio >= 0.50, p99 < 50 ms, no errors): {'met' if target else 'NOT met'}")
    print(f"median latency over all rows: {statistics.median(r[4] for r in rows):.2f} ms")
    return 0 if target else 1


if __name__ == "__main__":
    sys.exit(main())
