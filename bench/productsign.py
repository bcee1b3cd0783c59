"""productsign and pkgutil --check-signature on a 1 GiB package, next to ``cp`` and ``openssl dgst -sha1``
of the same package in the same run.

    ./dev bench productsign [--size-mib 1024] [--runs 5] [--dir DIR]

Builds a component package whose Payload is SIZE MiB of incompressible data (stored, as pkgbuild
stores a Payload), then, RUNS times and in turn: the references (``cp`` of the package, ``openssl
dgst -sha1`` of it), productsign through the library (a local key: the package work alone), with
and without the check of the files' archived checksums, ``signbridge productsign`` end to end (a
child process signing through a token served by ``tests/tokenkit.py``), with and without the check,
the same command on a tiny package (its fixed cost: interpreter start-up, finding the identity, two
signatures), and ``signbridge pkgutil --check-signature`` without and with ``--check-files``. Each
step's output is deleted and ``sync`` run, untimed, before it, so no step pays for another's
writeback or freed blocks.

The targets, as ratios taken within each run (the machine's load changes between runs, and every
step of a run shares it): ``signbridge productsign`` <= 1.2x (cp + openssl dgst -sha1), the data
being copied and checked in one pass; with ``--no-check-files`` <= 1.3x cp; ``pkgutil
--check-signature`` <= 1.2x one openssl pass, or no pass at all (it reads no file data, as Apple's).
Prints medians, best runs and the spread of each ratio.
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
from signbridge.apple.pkg.sign import sign_package
from signbridge.apple.pkg.xar.writer import PackageEntry, write_package
from signbridge.crypto.identity import Identity
from signbridge.crypto.signatures import SignatureRequest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64 * 1024 * 1024
CP, SHA1 = "cp", "openssl dgst -sha1"
LIBRARY, LIBRARY_SKIP = "productsign (library)", "productsign (library), --no-check-files"
COMMAND, COMMAND_SKIP = "signbridge productsign", "signbridge productsign --no-check-files"
TINY = "signbridge productsign, tiny package"
PKGUTIL, PKGUTIL_FILES = "signbridge pkgutil --check-signature", "... --check-signature --check-files"
# (what, over what, target)
TARGETS = [
    (COMMAND, (CP, SHA1), 1.2),
    (COMMAND_SKIP, (CP,), 1.3),
    (PKGUTIL, (SHA1,), 1.2),
    (LIBRARY, (CP, SHA1), None),
    (LIBRARY_SKIP, (CP,), None),
    (PKGUTIL_FILES, (SHA1,), None),
]


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
    # With bytecode caches, as an installed signbridge runs: the first run writes any that are missing.
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env = {**environment, "PYTHONPATH": str(ROOT / "src"), "SIGNBRIDGE_RUNTIME_DIR": str(runtime)}
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
        productsign = [sys.executable, "-m", "signbridge", "productsign", "--sign", "TEAM123456", "--timestamp=none"]
        pkgutil = [sys.executable, "-m", "signbridge", "pkgutil", "--check-signature", str(signed)]
        untrusted = {**env, "SIGNBRIDGE_ANCHORS": ""}  # the bench token's root is no anchor: exit status 1
        steps: dict[str, tuple[Callable[[], object], list[Path]]] = {
            CP: (lambda: run(["cp", str(package), str(copy)], env), [copy]),
            SHA1: (lambda: run(["openssl", "dgst", "-sha1", str(package)], env), []),
            LIBRARY: (lambda: sign_package(package, library, identity), [library]),
            LIBRARY_SKIP: (lambda: sign_package(package, library, identity, check_files=False), [library]),
            COMMAND: (lambda: run([*productsign, str(package), str(signed)], env), [signed]),
            COMMAND_SKIP: (lambda: run([*productsign, "--no-check-files", str(package), str(signed)], env), [signed]),
            TINY: (lambda: run([*productsign, str(tiny), str(tiny_signed)], env), [tiny_signed]),
            PKGUTIL: (lambda: run(pkgutil, untrusted, ok=(1,)), []),
            PKGUTIL_FILES: (lambda: run([*pkgutil, "--check-files"], untrusted, ok=(1,)), []),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for number in range(options.runs):
            for name, (step, outputs) in steps.items():
                times[name].append(timed(step, outputs))
            print(f"run {number + 1}: " + ", ".join(f"{name} {t[-1]:.2f}s" for name, t in times.items()), flush=True)
    finally:
        if token is not None:
            token.communicate(input="", timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    report(times, options.size_mib, options.runs)


def report(times: dict[str, list[float]], size: int, runs: int) -> None:
    print(f"\n{size} MiB package, {runs} runs\n")
    print(f"{'step':<44} {'best s':>7} {'median s':>9} {'spread s':>12}")
    print(f"{'-' * 44} {'-' * 7} {'-' * 9} {'-' * 12}")
    rows = {CP: times[CP], SHA1: times[SHA1], f"{CP} + {SHA1} (each run's sum)": [
        copy + digest for copy, digest in zip(times[CP], times[SHA1], strict=True)
    ]} | {name: values for name, values in times.items() if name not in (CP, SHA1)}
    for name, values in rows.items():
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(f"{name:<44} {min(values):>7.2f} {statistics.median(values):>9.2f} {spread:>12}")
    print("\nRatios within each run (median, and the range over the runs):\n")
    for name, references, target in TARGETS:
        ratios = [times[name][i] / sum(times[ref][i] for ref in references) for i in range(runs)]
        median = statistics.median(ratios)
        verdict = "" if target is None else f"  target <= {target}: {'met' if median <= target else 'NOT met'}"
        print(f"{name} / ({' + '.join(references)}): {median:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}){verdict}")


if __name__ == "__main__":
    main()
