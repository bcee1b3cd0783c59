"""productsign on a 1 GiB package, next to ``cp`` of the same package in the same run.

    PYTHONPATH=src .venv/bin/python bench/productsign.py [--size-mib 1024] [--runs 5] [--dir DIR]

Builds a component package whose Payload is SIZE MiB of incompressible data (stored, as pkgbuild
stores a Payload), then, RUNS times and in turn: ``cp`` of the package, productsign through the
library (a local key: the cost of the package work alone), ``signbridge productsign`` end to end
(a child process signing through a token served by ``tests/tokenkit.py``), the same command on a
tiny package (its fixed cost: interpreter start-up, finding the identity, two signatures), and
``signbridge pkgutil --check-signature`` (which reads and hashes every byte of the payload, so it
costs more than a copy). Each step's output is deleted and ``sync`` run, untimed, before it, so no
step pays for another's writeback or freed blocks. Prints the medians and their ratio to ``cp``.
The target: what grows with the package costs at most 1.3x a copy.
"""

# ruff: noqa: E402 - the imports wait until sys.path is fixed (below)
from __future__ import annotations

import os
import sys

# Run as a script, this file's directory is first on sys.path, and bench/token.py there shadows the
# standard library's ``token`` module: take the directory off first.
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or ".") != _HERE]

import argparse
import datetime
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.x509.oid import NameOID

from signbridge.apple.certificates import EKU_DEVELOPER_ID_INSTALLER
from signbridge.apple.productsign import sign_package
from signbridge.apple.xar import PackageEntry, write_package
from signbridge.identity import Identity
from signbridge.signatures import SignatureRequest

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.3
BLOCK = 64 * 1024 * 1024


def installer_identity() -> Identity:
    """A self-signed installer certificate with a local RSA-2048 key."""
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Developer ID Installer: Bench (BENCH12345)")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier(EKU_DEVELOPER_ID_INSTALLER)]), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip

    def sign(request: SignatureRequest) -> bytes:
        return key.sign(request.digest, padding.PKCS1v15(), utils.Prehashed(request.hash_algorithm.cryptography_hash()))

    return Identity(certificate, (), sign, "bench")


def build_package(directory: Path, size_mib: int) -> Path:
    payload = directory / "Payload"
    block = os.urandom(BLOCK)
    with open(payload, "wb") as f:
        for _ in range(size_mib * 1024 * 1024 // BLOCK):
            f.write(block)
        f.write(block[: size_mib * 1024 * 1024 % BLOCK])
    entries = [
        PackageEntry("PackageInfo", b'<pkg-info identifier="bench" version="1" install-location="/"/>\n'),
        PackageEntry("Bom", os.urandom(4096)),
        PackageEntry("Payload", payload, compress=False),
    ]
    package = write_package(directory / "bench.pkg", entries)
    payload.unlink()
    return package


def timed(step: Callable[[], object], outputs: list[Path]) -> float:
    """Time ``step`` alone: its outputs are deleted beforehand (replacing a 1 GiB file costs its
    blocks being freed, which cp to a new file does not pay) and all writes flushed."""
    for output in outputs:
        output.unlink(missing_ok=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run(args: list[str], env: dict[str, str], ok: tuple[int, ...] = ()) -> None:
    result = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if result.returncode not in (0, *ok):
        raise SystemExit(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    options = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="signbridge-bench-", dir=options.dir))
    runtime = directory / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SIGNBRIDGE_RUNTIME_DIR": str(runtime)}
    token = None
    try:
        print(f"building a {options.size_mib} MiB package in {directory} ...", flush=True)
        package = build_package(directory, options.size_mib)
        identity = installer_identity()
        token = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tokenkit.py"), "serve", "bench"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        if token.stdout is None or token.stdout.readline().strip() != "ready":
            raise SystemExit("the benchmark token did not start")
        copy, library, signed = directory / "copy.pkg", directory / "library.pkg", directory / "signed.pkg"
        tiny = write_package(directory / "tiny.pkg", [PackageEntry("PackageInfo", b"<pkg-info/>")])
        tiny_signed = directory / "tiny-signed.pkg"
        cli = [sys.executable, "-m", "signbridge"]
        steps: dict[str, tuple[Callable[[], object], list[Path]]] = {
            "cp": (lambda: run(["cp", str(package), str(copy)], env), [copy]),
            "productsign (library, local key)": (lambda: sign_package(package, library, identity), [library]),
            "signbridge productsign (CLI, token)": (
                lambda: run([*cli, "productsign", "--sign", "TEAM123456", "--timestamp=none", str(package),
                             str(signed)], env),  # fmt: skip
                [signed],
            ),
            "signbridge productsign, tiny package": (
                lambda: run([*cli, "productsign", "--sign", "TEAM123456", "--timestamp=none", str(tiny),
                             str(tiny_signed)], env),  # fmt: skip
                [tiny_signed],
            ),
            "signbridge pkgutil --check-signature": (lambda: run([*cli, "pkgutil", "--check-signature", str(signed)],
                                                                 {**env, "SIGNBRIDGE_ANCHORS": ""}, ok=(1,)), []),
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in steps}
        for number in range(options.runs):
            for name, (step, outputs) in steps.items():
                times[name].append(timed(step, outputs))
            print(f"run {number + 1}: " + ", ".join(f"{name.split(' (')[0]} {t[-1]:.2f}s" for name, t in times.items()),
                  flush=True)  # fmt: skip
    finally:
        if token is not None:
            token.communicate(input="", timeout=30)
        shutil.rmtree(directory, ignore_errors=True)

    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    size = options.size_mib
    print(f"\nproductsign of a {size} MiB package vs cp, {options.runs} runs (target <= {TARGET}x cp)\n")
    print(f"{'step':<40} {'best s':>7} {'median s':>9} {'MiB/s':>7} {'x cp':>6}")
    print(f"{'-' * 40} {'-' * 7} {'-' * 9} {'-' * 7} {'-' * 6}")
    for name in times:
        rate = "-" if "tiny" in name else f"{size / best[name]:.0f}"
        print(f"{name:<40} {best[name]:>7.2f} {median[name]:>9.2f} {rate:>7} {best[name] / best['cp']:>6.2f}")
    library = best["productsign (library, local key)"] / best["cp"]
    command = best["signbridge productsign (CLI, token)"] / best["cp"]
    grows = (best["signbridge productsign (CLI, token)"] - best["signbridge productsign, tiny package"]) / best["cp"]
    verdict = "within" if library <= TARGET and grows <= TARGET else "OVER"
    print("\nRatios of the best runs (the machine's other work only ever adds time):")
    print(f"productsign (library) / cp: {library:.2f}x; signbridge productsign / cp: {command:.2f}x, of which the")
    print(f"part that grows with the package (minus the same command on a tiny package) / cp: {grows:.2f}x")
    print(f"-> {verdict} the {TARGET}x target for the cost beyond a copy")

if __name__ == "__main__":
    main()
