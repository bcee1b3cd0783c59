"""SignHash throughput and latency over loopback, next to the raw RSA-2048 sign rate of the same key.

    ./dev bench service [--workers N] [--seconds S]

Starts a demo service with N worker processes (default: one per core), measures the raw sign rate of
the release-signing key in N processes, then drives SignHash with 1, 8 and 32 concurrent keep-alive
clients and prints throughput, p50/p99 latency and the ratio to the raw rate.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
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


def build_requests(port: int, organization: str, token: str, count: int = 64) -> list[bytes]:
    requests = []
    for i in range(count):
        body = json.dumps({
            "projectSlug": "demo",
            "signingPolicySlug": "release-signing",
            "hashSigningData": {
                "hash": base64.b64encode(HashAlgorithm.SHA256.digest(i.to_bytes(4, "big"))).decode(),
                "signatureAlgorithm": "Rsa",
                "rsaOptions": {"hashAlgorithmName": "Sha256", "paddingMode": "Pkcs1"},
            },
        }).encode()
        head = (
            f"POST /Api/v1/{organization}/SigningRequests/SignHash HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        requests.append(head + body)
    return requests


async def _client(port: int, requests: list[bytes], deadline: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = 0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        writer.write(requests[i % len(requests)])
        i += 1
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        if b" 200 " not in status_line:
            errors.append(int(status_line.split()[1]))
        latencies.append(time.perf_counter() - started)
    writer.close()


async def _load(port: int, requests: list[bytes], clients: int, seconds: float) -> tuple[list[float], list[int], float]:
    latencies: list[float] = []
    errors: list[int] = []
    warmup = time.perf_counter() + 0.5
    await asyncio.gather(*(_client(port, requests, warmup, [], []) for _ in range(clients)))
    started = time.perf_counter()
    await asyncio.gather(*(_client(port, requests, started + seconds, latencies, errors) for _ in range(clients)))
    return latencies, errors, time.perf_counter() - started


def load_worker(args: tuple[int, list[bytes], int, float]) -> tuple[list[float], list[int], float]:
    port, requests, clients, seconds = args
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_load(port, requests, clients, seconds))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="signbridge-bench-") as temporary:
        data_dir = Path(temporary) / "data"
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "signbridge", "server", "init", "--demo", "--json", "--data-dir", str(data_dir)],
            check=True, capture_output=True, text=True,
        ).stdout)
        import sqlite3

        with sqlite3.connect(data_dir / "signbridge.db") as db:
            (key_ref,) = db.execute(
                "SELECT c.key_ref FROM certificates c JOIN signing_policies p ON p.certificate_id = c.id "
                "WHERE p.slug = 'release-signing'"
            ).fetchone()

        raw = raw_rate(data_dir, key_ref, args.workers, args.seconds)
        rows = []
        with ServiceProcess(data_dir, workers=args.workers) as service:
            requests = build_requests(service.port, info["organizationId"], info["apiToken"])
            for clients in (int(c) for c in args.clients.split(",")):
                # The load generator runs in its own process, as a separate client machine would.
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    latencies, errors, elapsed = pool.apply(load_worker, ((service.port, requests, clients, args.seconds),))
                throughput = len(latencies) / elapsed
                rows.append((clients, len(latencies), len(errors), throughput, percentile(latencies, 0.5) * 1000,
                             percentile(latencies, 0.99) * 1000, throughput / raw))

    print(f"RSA-2048 SignHash over loopback; service: {args.workers} worker(s); {args.seconds:g} s per row; "
          f"{os.cpu_count()} CPU core(s) shared by service, load generator and raw measurement (run one after the other)")
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
