"""The crypto provider: time from ``signbridge start`` to ready, and the time a sign adds through the token.

    PYTHONPATH=src .venv/bin/python bench/token.py [--runs 3] [--signs 300]

A demo service gets projects with 1, 100 and 1,000 signing policies (each with its own certificate,
issued by one local CA; made through the admin library, which is much quicker than the CLI). For
each, ``signbridge start --project-slug benchN`` is timed from launch to exit (it exits when the
token is ready); the token process alone from spawn to ready (``daemon.spawn`` from this process);
and, from the token's log, its loading in two parts: fetching (``MySigningPolicies``, the
certificates parsed) and building the object table. Spawn-to-ready less loading is the
interpreter's start-up, the imports and the socket and p11-kit registration. The reference,
measured in the same run: ``python -c "import cryptography.x509"`` (a fresh interpreter that
imports one library).

Then, in one run, the same RSA-2048 key signs SHA-256 digests alternately by calling ``SignHash``
directly (``ServiceClient``, keep-alive) and through the token (the pure-Python PKCS#11 client over
the token's socket, ``CKM_RSA_PKCS``): the difference of the medians is what the token adds.
"""

# ruff: noqa: E402 - the imports wait until sys.path is fixed (below)
from __future__ import annotations

import os
import sys

# Run as a script, this file's directory is first on sys.path, and this file's name shadows the
# standard library's ``token`` module (``tokenize`` imports it): take the directory off first.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or ".") != _HERE]

import argparse
import datetime
import hashlib
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from signbridge.api.client import ServiceClient
from signbridge.crypto.hashes import HashAlgorithm
from signbridge.crypto.signatures import Scheme, SignatureRequest
from signbridge.pkcs11 import CKM, CKO, Pkcs11Client
from signbridge.provider import daemon
from signbridge.provider.settings import load_settings
from signbridge.server import directory
from signbridge.server.datadir import open_data_dir
from signbridge.server.keystores import KeySpec
from signbridge.server.process import ServiceProcess

SIZES = (1, 100, 1000)
DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")
SRC = Path(__file__).resolve().parent.parent / "src"


def _certificate(subject: str, public_key, issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,  # noqa: ANN001
                 *, ca: bool) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def add_bench_projects(data_dir: Path, organization_id: str) -> None:
    """Projects bench1, bench100, bench1000: N policies, N certificates, one keystore key, demo-ci submits."""
    store = open_data_dir(data_dir)
    try:
        with store.session() as session:
            organization = directory.get_organization(session, organization_id)
            user = directory.get_user(session, organization, "demo-ci")
            ref = store.keystore.generate(KeySpec.EC_P256, "Demo Corp/bench")
            public_key = store.keystore.public_key(ref)
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")])
            ca = _certificate("Bench CA", ca_key.public_key(), ca_name, ca_key, ca=True)
            for size in SIZES:
                project = directory.create_project(session, organization, f"bench{size}")
                for index in range(size):
                    leaf = _certificate(f"Bench {size} signer {index}", public_key, ca_name, ca_key, ca=False)
                    row = directory.add_certificate(
                        session, organization=organization, slug=f"bench{size}-{index}", key_ref=ref,
                        key_spec=KeySpec.EC_P256, certificate=leaf, chain=[ca],
                    )  # fmt: skip
                    policy = directory.create_policy(session, project, f"policy-{index}", row)
                    directory.add_submitter(session, policy, user=user)
    finally:
        store.close()


def provider_env(runtime: Path, api_url: str, organization_id: str, token: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SIGNPATH_")}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
        "SIGNBRIDGE_RUNTIME_DIR": str(runtime / "run"),
        "SIGNPATH_LOG_FILE_DIRECTORY": str(runtime / "log"),
        "SIGNPATH_API_URL": api_url,
        "SIGNPATH_ORGANIZATION_ID": organization_id,
        "SIGNPATH_API_TOKEN": token,
    })  # fmt: skip
    return env


def signbridge(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "signbridge", *args], capture_output=True, text=True, env=env,
                          check=False)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"signbridge {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def time_spawn(env: dict[str, str], size: int) -> float:
    """The token process alone: spawned from this (already loaded) process until it reports ready."""
    os.environ.update(env)
    settings = load_settings(cli={"project_slug": f"bench{size}"}, environ=env)
    started = time.perf_counter()
    daemon.spawn(settings, f"bench-spawn-{size}")
    elapsed = time.perf_counter() - started
    signbridge(env, "stop", "--all")
    return elapsed


def time_reference(runs: int) -> float:
    """Median wall time of ``python -c "import cryptography.x509"``."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import cryptography.x509"], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_start(env: dict[str, str], log_file: Path, size: int, runs: int) -> tuple[float, ...]:
    """Medians: wall time of ``signbridge start``, the token process alone, and the loading it
    logged: the whole, fetching the policies, building the objects."""
    walls, loads, fetches, builds, spawns, references = [], [], [], [], [], []
    for _ in range(runs):
        references.append(time_reference(1))
        spawns.append(time_spawn(env, size))
        offset = log_file.stat().st_size if log_file.exists() else 0
        started = time.perf_counter()
        proc = signbridge(env, "start", "--project-slug", f"bench{size}")
        walls.append(time.perf_counter() - started)
        assert f"is ready: {size} identit" in proc.stdout, proc.stdout
        with log_file.open() as handle:
            handle.seek(offset)
            found = re.findall(
                rf"loaded {size} identities in ([0-9.]+) s(?: \(fetching ([0-9.]+) s, objects ([0-9.]+) s\))?",
                handle.read(),
            )
        # An older token logs only the whole (its parts are then shown as nan).
        load, fetch, build = (float(value or "nan") for value in found[-1])
        loads.append(load)
        fetches.append(fetch)
        builds.append(build)
        signbridge(env, "stop", "--all")
    return tuple(statistics.median(values) for values in (walls, spawns, loads, fetches, builds, references))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def time_signs(env: dict[str, str], runtime: Path, api_url: str, organization_id: str, token: str,
               count: int) -> tuple[list[float], list[float]]:  # fmt: skip
    signbridge(env, "start", "--project-slug", "demo", "--signing-policy-slug", "release-signing")
    socket_path = next((runtime / "run" / "tokens").glob("*/pkcs11.sock"))
    direct, through = [], []
    try:
        with ServiceClient(api_url, organization_id, token) as client, Pkcs11Client.connect(socket_path) as pkcs11:
            pkcs11.login("CONFIG")
            (key,) = pkcs11.objects(object_class=CKO.PRIVATE_KEY, label="demo/release-signing")
            for index in range(count + 20):  # the first 20 of each warm up connections and caches
                digest = hashlib.sha256(f"bench {index}".encode()).digest()
                request = SignatureRequest(digest, HashAlgorithm.SHA256, Scheme.RSA_PKCS1)
                started = time.perf_counter()
                client.sign_hash("demo", "release-signing", request)
                middle = time.perf_counter()
                pkcs11.sign(key, CKM.RSA_PKCS, DIGEST_INFO_SHA256 + digest)
                ended = time.perf_counter()
                if index >= 20:
                    direct.append(middle - started)
                    through.append(ended - middle)
    finally:
        signbridge(env, "stop", "--all")
    return direct, through


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="starts per size (the median is shown)")
    parser.add_argument("--signs", type=int, default=300, help="signs per path")
    args = parser.parse_args()
    # With bytecode caches, as an installed signbridge runs: the first start writes any that are missing.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

    with tempfile.TemporaryDirectory(prefix="sbb", dir="/tmp") as temporary:
        base = Path(temporary)
        data_dir = base / "data"
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "signbridge", "server", "init", "--demo", "--json", "--data-dir", str(data_dir)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(SRC)},
        ).stdout)  # fmt: skip
        organization_id, token = info["organizationId"], info["apiToken"]
        add_bench_projects(data_dir, organization_id)
        with ServiceProcess(data_dir) as service:
            env = provider_env(base, service.api_url, organization_id, token)
            log_file = base / "log" / "signbridge-provider.log"
            print(f"Until the token is ready, median of {args.runs}. signbridge start: the whole command. "
                  "Token process: spawned until ready. Load: MySigningPolicies (fetch) + the token's "
                  "objects (build).")  # fmt: skip
            print(f'Reference: python -c "import cryptography.x509", run before each start. Load average '
                  f"{os.getloadavg()[0]:.1f}.")  # fmt: skip
            print(f"{'policies':>9}  {'signbridge start':>16}  {'token process':>13}  {'load':>7}  {'fetch':>7}  "
                  f"{'build':>7}  {'reference':>9}  {'start / reference':>17}")  # fmt: skip
            for size in SIZES:
                wall, spawned, load, fetch, build, reference = time_start(env, log_file, size, args.runs)
                print(f"{size:>9}  {wall * 1000:>13.0f} ms  {spawned * 1000:>10.0f} ms  {load * 1000:>4.0f} ms  "
                      f"{fetch * 1000:>4.0f} ms  {build * 1000:>4.0f} ms  {reference * 1000:>6.0f} ms  "
                      f"{wall / reference:>16.1f}x")  # fmt: skip
            direct, through = time_signs(env, base, service.api_url, organization_id, token, args.signs)
        print()
        print(f"RSA-2048 SHA-256 sign, {args.signs} each, alternating, same run")
        print(f"{'path':<28}  {'p50':>9}  {'p90':>9}  {'p99':>9}")
        for label, values in (("SignHash directly", direct), ("through the token (PKCS#11)", through)):
            row = "  ".join(f"{percentile(values, q) * 1000:>6.2f} ms" for q in (0.5, 0.9, 0.99))
            print(f"{label:<28}  {row}")
        added = statistics.median(through) - statistics.median(direct)
        print(f"{'the token adds (p50)':<28}  {added * 1000:>6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
