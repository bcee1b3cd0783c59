"""codesign's speed next to plain hashing of the same bytes, measured in the same run.

    ./dev bench codesign [--runs 5] [--only-macho] [--only-bundle] [--only-dmg] [--skip-bundle]
                         [--size-mib 256] [--files 5000] [--dmg-size-mib 1024] [--work-dir DIR]

1. A single-architecture arm64 Mach-O of ``--size-mib`` MiB (clang + ld64.lld; a seeded random
   blob in ``__TEXT`` through ``.incbin``) is signed ad hoc and with an RSA-2048 identity
   (local key), each time from a fresh copy, next to ``openssl dgst -sha256`` of the same file.
   Target: at most 1.0x.
2. A bundle of ``--files`` resource files (about 500 MB) with 20 nested binaries (10 framework
   bundles and 10 loose dylibs, universal) is signed ``--deep``, next to what its seal's digests
   cost alone: ``openssl dgst -sha256`` and ``openssl dgst -sha1`` over every file, one process
   each (CodeResources stores both digests of every file). Target: at most 1.3x.
3. A UDIF disk image of ``--dmg-size-mib`` MiB is signed ad hoc and with the RSA identity, next
   to ``openssl dgst -sha256`` of the same file. Target: at most 1.1x. The last table is the
   floor: the engine's one SHA-256 over the image, writing nothing.

``--work-dir`` chooses the file system: on one with reflinks (XFS, btrfs) the staged output
shares the input's blocks instead of copying them (see docs/benchmarks.md).

Each run times every step once, in turn, so that a change in the machine's load weighs on the
reference and the engine alike; the tables give best, median and range, the median's ratio to the
reference's median and whether it meets the target. Times are wall-clock seconds; the engine runs
in this process (``signbridge codesign`` adds the interpreter's start-up, shown in the CLI row).
The tools (clang, ld64.lld, llvm-lipo, openssl, sha256sum) are Debian's.
"""

# ruff: noqa: E402 - the path must be fixed before the other imports (see below)
from __future__ import annotations

import os
import sys

# Scripts in bench/ are named like standard modules (token.py shadows the tokenize module's
# token): keep their directory off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

import argparse
import datetime
import plistlib
import random
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from signbridge.apple import codesign as cs
from signbridge.apple.codesig.codedirectory import HashType
from signbridge.apple.codesig.options import CodesignOptions
from signbridge.apple.dmg.detect import TRAILER_SIZE
from signbridge.apple.dmg.sign import sign_disk_image
from signbridge.apple.dmg.udif import hash_code
from signbridge.crypto.identity import Identity
from signbridge.crypto.signatures import SignatureRequest

ROOT = Path(__file__).resolve().parent.parent
LLVM = Path("/usr/lib/llvm-14/bin")
MIB = 1024 * 1024

MAIN_C = "int start(void){ volatile int x = 42; for(;;) x++; }\n"
LIB_C = "int add(int a,int b){return a+b;}\nint counter = 7;\n"


def run(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(arg) for arg in args], check=True, cwd=cwd, capture_output=True)


def timed(action: Callable[[], object], prepare: Callable[[], object] | None, runs: int) -> list[float]:
    """Wall-clock times of ``action``; before each, ``prepare`` and a sync, so that no earlier
    write-back competes for the cores."""
    times = []
    for _ in range(runs):
        if prepare is not None:
            prepare()
        os.sync()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return times


# --- inputs ---------------------------------------------------------------------------------------


def write_random(stream: BinaryIO, size: int, seed: int) -> None:
    generator = random.Random(seed)
    for _ in range(size // (16 * MIB)):
        stream.write(generator.randbytes(16 * MIB))
    stream.write(generator.randbytes(size % (16 * MIB)))


def build_big_macho(directory: Path, size: int) -> Path:
    blob = directory / "blob.bin"
    with blob.open("wb") as stream:
        write_random(stream, size, 20260611)
    (directory / "big.S").write_text('.section __TEXT,__const\n.incbin "blob.bin"\n')
    (directory / "main.c").write_text(MAIN_C)
    target = ["--target=arm64-apple-macos11"]
    run(LLVM / "clang", *target, "-c", "big.S", "-o", "big.o", cwd=directory)
    run(LLVM / "clang", *target, "-O1", "-c", "main.c", "-o", "main.o", cwd=directory)
    output = directory / "big.arm64"
    run(LLVM / "ld64.lld", "-arch", "arm64", "-platform_version", "macos", "11.0", "11.0", "-e", "_start",
        "main.o", "big.o", "-o", output, cwd=directory)  # fmt: skip
    blob.unlink()
    return output


def build_dylib(directory: Path) -> Path:
    """A universal (x86_64 + arm64) dylib."""
    (directory / "lib.c").write_text(LIB_C)
    slices = []
    targets = (("arm64", "arm64-apple-macos11", "11.0"), ("x86_64", "x86_64-apple-macos10.15", "10.15"))
    for arch, target, version in targets:
        run(LLVM / "clang", f"--target={target}", "-O1", "-c", "lib.c", "-o", f"lib.{arch}.o", cwd=directory)
        run(LLVM / "ld64.lld", "-arch", arch, "-platform_version", "macos", version, version, "-dylib",
            "-install_name", "@rpath/libdemo.dylib", f"lib.{arch}.o", "-o", f"lib.{arch}.dylib",
            cwd=directory)  # fmt: skip
        slices.append(directory / f"lib.{arch}.dylib")
    output = directory / "libdemo.universal.dylib"
    run(LLVM / "llvm-lipo", "-create", *slices, "-output", output)
    return output


def build_bundle(directory: Path, files: int, dylib: Path, main: Path) -> Path:
    """MyApp.app: ``files`` resources of 100 KB on average, 10 frameworks and 10 loose dylibs."""
    app = directory / "MyApp.app"
    contents = app / "Contents"
    (contents / "MacOS").mkdir(parents=True)
    (contents / "Frameworks").mkdir()
    shutil.copyfile(main, contents / "MacOS" / "MyApp")
    os.chmod(contents / "MacOS" / "MyApp", 0o755)
    info = {"CFBundleExecutable": "MyApp", "CFBundleIdentifier": "com.example.MyApp"}
    (contents / "Info.plist").write_bytes(plistlib.dumps(info))
    generator = random.Random(5000)
    for number in range(files):
        folder = contents / "Resources" / f"group{number % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"item{number:05d}.bin").write_bytes(generator.randbytes(generator.randint(1, 200 * 1024)))
    for number in range(10):
        name = f"Kit{number}"
        version = contents / "Frameworks" / f"{name}.framework" / "Versions" / "A"
        (version / "Resources").mkdir(parents=True)
        shutil.copyfile(dylib, version / name)
        framework_info = {"CFBundleExecutable": name, "CFBundleIdentifier": f"com.example.{name}"}
        (version / "Resources" / "Info.plist").write_bytes(plistlib.dumps(framework_info))
        os.symlink("A", version.parent / "Current")
        os.symlink(f"Versions/Current/{name}", version.parent.parent / name)
        os.symlink("Versions/Current/Resources", version.parent.parent / "Resources")
        shutil.copyfile(dylib, contents / "Frameworks" / f"libhelper{number}.dylib")
    return app


def local_identity() -> Identity:
    """An RSA-2048 code-signing identity under a two-level test CA, signing with a local key."""
    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench Corp")])  # fmt: skip

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )  # fmt: skip
        if not ca:
            usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING])
            builder = builder.add_extension(usage, critical=True)
        return builder.sign(issuer_key, hashes.SHA256())

    root_key = rsa.generate_private_key(65537, 2048)
    key = rsa.generate_private_key(65537, 2048)
    root = certificate("Bench Root CA", root_key, "Bench Root CA", root_key, ca=True)
    leaf = certificate("Bench Code Signing", key, "Bench Root CA", root_key, ca=False)

    def sign(request: SignatureRequest) -> bytes:
        prehashed = utils.Prehashed(request.hash_algorithm.cryptography_hash())
        return key.sign(request.digest, padding.PKCS1v15(), prehashed)

    return Identity(leaf, (root,), sign, "bench")


def build_big_dmg(directory: Path, size: int) -> Path:
    """A UDIF image of ``size`` bytes of seeded random data in raw (uncompressed) 1 MiB chunks.

    pydmg, the writer the tests use, refuses images over 512 MiB, so the bench writes this one
    itself: the data fork, a ``blkx`` table (``mish``) in the property list, the ``koly`` trailer.
    ``7zz t`` accepts it."""
    sectors = size // 512
    chunk_sectors = 2048
    chunks = []
    for first in range(0, sectors, chunk_sectors):
        count = min(chunk_sectors, sectors - first)
        chunks.append(struct.pack(">IIQQQQ", 1, 0, first, count, first * 512, count * 512))
    chunks.append(struct.pack(">IIQQQQ", 0xFFFFFFFF, 0, sectors, 0, size, 0))
    mish = struct.pack(">4sIQQQII24x", b"mish", 1, 0, sectors, 0, 0, 0) + bytes(136)
    mish += struct.pack(">I", len(chunks)) + b"".join(chunks)
    name = "whole disk (unknown partition : 0)"
    plist = plistlib.dumps({"resource-fork": {"blkx": [
        {"Attributes": "0x0050", "CFName": name, "Data": mish, "ID": "0", "Name": name},
    ]}})  # fmt: skip
    trailer = bytearray(512)
    struct.pack_into(">4sIII", trailer, 0, b"koly", 4, 512, 1)
    struct.pack_into(">QQQ", trailer, 16, 0, 0, size)
    struct.pack_into(">II16s", trailer, 56, 1, 1, random.Random(7).randbytes(16))
    struct.pack_into(">QQ", trailer, 216, size, len(plist))
    struct.pack_into(">IQ", trailer, 488, 1, sectors)
    output = directory / "big.dmg"
    with output.open("wb") as stream:
        write_random(stream, size, 20261203)
        stream.write(plist)
        stream.write(trailer)
    return output


# --- measurements ---------------------------------------------------------------------------------

Row = tuple[str, str, str, str, str, str]
HEADERS: Row = ("", "best (s)", "median (s)", "spread (s)", "median / reference", "target")


def row(label: str, times: list[float], reference: float | None = None, target: float | None = None) -> Row:
    """One line of a table: best, median, the range of ``times``, the median's ratio to the
    reference's median and, when there is a target ratio, whether the median meets it."""
    best, median = min(times), statistics.median(times)
    ratio = f"{median / reference:.2f}x" if reference else "1.00x" if target is None else ""
    goal = ""
    if target is not None and reference:
        goal = f"<= {target:.1f}x " + ("met" if median / reference <= target else "missed")
    return label, f"{best:.3f}", f"{median:.3f}", f"{best:.3f}-{max(times):.3f}", ratio, goal


def print_table(title: str, rows: list[Row], runs: int) -> None:
    widths = [max(len(item[i]) for item in [HEADERS, *rows]) for i in range(len(HEADERS))]
    print(f"\n{title} ({runs} runs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end)")
    for item in (HEADERS, tuple("-" * width for width in widths), *rows):
        print("  ".join(text.ljust(width) for text, width in zip(item, widths, strict=True)).rstrip())


def run_all(command: list[str], paths: list[str]) -> None:
    """``command`` with every path in ``paths`` as arguments: one process, or a few when the
    list is longer than a command line may be."""
    batch: list[str] = []
    length = 0
    for path in paths:
        if batch and length + len(path) > 1 << 20:
            subprocess.run([*command, *batch], check=True, capture_output=True)
            batch, length = [], 0
        batch.append(path)
        length += len(path) + 1
    if batch:
        subprocess.run([*command, *batch], check=True, capture_output=True)


def bench_file(
    title: str, source: Path, target: Path, runs: int, sign: Callable[[Identity | None], object],
    identity: Identity, goal: float, *, sha256sum: bool = True,
) -> float:
    """Sign fresh copies of ``source`` at ``target`` ad hoc, with ``identity`` and with the CLI,
    next to ``openssl dgst -sha256`` (and ``sha256sum``) of the same file, alternating them run by
    run so that the machine's load weighs on all alike. Returns the reference's median."""

    def fresh() -> None:
        shutil.copyfile(source, target)

    def tool(*command: str | Path) -> Callable[[], object]:
        return lambda: subprocess.run(command, check=True, capture_output=True)

    # With bytecode caches, as an installed signbridge runs: the first run writes any that are missing.
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    environment["PYTHONPATH"] = str(ROOT / "src")
    command = [sys.executable, "-m", "signbridge", "codesign", "-f", "-s", "-", str(target)]
    steps: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {
        "openssl dgst -sha256 (reference)": (tool("openssl", "dgst", "-sha256", target), None),
        "sha256sum": (tool("sha256sum", target), None),
        "codesign engine, ad hoc": (lambda: sign(None), fresh),
        "codesign engine, RSA-2048 identity": (lambda: sign(identity), fresh),
        "signbridge codesign -s - (CLI process)": (
            lambda: subprocess.run(command, check=True, capture_output=True, env=environment), fresh),
    }  # fmt: skip
    if not sha256sum:
        del steps["sha256sum"]
    fresh()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(runs):
        for label, (action, prepare) in steps.items():
            times[label] += timed(action, prepare, 1)
    reference = statistics.median(times["openssl dgst -sha256 (reference)"])
    rows = [row(label, measured, None if n == 0 else reference, None if n == 0 or "engine" not in label else goal)
            for n, (label, measured) in enumerate(times.items())]  # fmt: skip
    print_table(f"{title}, {source.stat().st_size / MIB:.0f} MiB", rows, runs)
    return reference


def bench_macho(work: Path, size_mib: int, runs: int, pool: ThreadPoolExecutor, identity: Identity) -> None:
    source = build_big_macho(work, size_mib * MIB)
    forced = CodesignOptions(force=True)
    target = work / "big.signing"
    bench_file("Single-architecture Mach-O", source, target, runs,
               lambda signer: cs.sign_code(target, signer, forced, executor=pool), identity, 1.0)  # fmt: skip


def bench_bundle(work: Path, files: int, runs: int, pool: ThreadPoolExecutor, identity: Identity) -> None:
    """The reference is what the seal's digests cost by themselves: one ``openssl dgst -sha256``
    and one ``openssl dgst -sha1`` over every file (CodeResources stores both)."""
    dylib = build_dylib(work)
    (work / "main").mkdir()
    (work / "template").mkdir()
    main = build_big_macho(work / "main", 4 * MIB)
    template = build_bundle(work / "template", files, dylib, main)
    app = work / "MyApp.app"
    everything = sorted(str(p) for p in template.rglob("*") if p.is_file() and not p.is_symlink())
    total = sum(os.path.getsize(p) for p in everything)

    def fresh() -> None:
        shutil.rmtree(app, ignore_errors=True)
        shutil.copytree(template, app, symlinks=True)

    def openssl_all() -> None:
        run_all(["openssl", "dgst", "-sha256"], everything)
        run_all(["openssl", "dgst", "-sha1"], everything)

    deep = CodesignOptions(deep=True)
    steps: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {
        "openssl dgst -sha256 and -sha1 of every file (reference)": (openssl_all, None),
        "sha256sum of every file": (
            lambda: run_all(["sha256sum"], everything), None),
        "codesign engine, ad hoc": (lambda: cs.sign_code(app, None, deep, executor=pool), fresh),
        "codesign engine, RSA-2048 identity": (lambda: cs.sign_code(app, identity, deep, executor=pool), fresh),
    }  # fmt: skip
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(runs):
        for label, (action, prepare) in steps.items():
            times[label] += timed(action, prepare, 1)
    reference = statistics.median(times["openssl dgst -sha256 and -sha1 of every file (reference)"])
    rows = [row(label, measured, None if n == 0 else reference, 1.3 if "engine" in label else None)
            for n, (label, measured) in enumerate(times.items())]  # fmt: skip
    print_table(f"Bundle: {len(everything)} files, {total / 1e6:.0f} MB, 20 nested binaries, --deep", rows, runs)


def bench_dmg(work: Path, size_mib: int, runs: int, pool: ThreadPoolExecutor, identity: Identity) -> None:
    source = build_big_dmg(work, size_mib * MIB)
    forced = CodesignOptions(force=True)
    target = work / "big.signing.dmg"
    reference = bench_file("Disk image (UDIF)", source, target, runs,
                           lambda signer: sign_disk_image(target, signer, forced, executor=pool), identity, 1.1,
                           sha256sum=False)  # fmt: skip

    def hash_only() -> None:
        with source.open("rb") as stream:
            hash_code(stream.fileno(), source.stat().st_size - TRAILER_SIZE, [HashType.SHA256])

    hashing = timed(hash_only, None, runs)
    print_table("The floor: the engine's SHA-256 of the image alone (no output written)",
                [row("engine's hash alone", hashing, reference)], runs)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dmg-size-mib", type=int, default=1024)
    parser.add_argument("--only-macho", action="store_true")
    parser.add_argument("--only-bundle", action="store_true")
    parser.add_argument("--only-dmg", action="store_true")
    parser.add_argument("--skip-bundle", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the inputs are written and signed (default: the system's temporary directory)")
    arguments = parser.parse_args()
    chosen = {name for name in ("macho", "bundle", "dmg") if getattr(arguments, f"only_{name}")}
    chosen = chosen or {"macho", "dmg"} | (set() if arguments.skip_bundle else {"bundle"})
    identity = local_identity()
    with (
        tempfile.TemporaryDirectory(prefix="bench-codesign-", dir=arguments.work_dir) as temporary,
        ThreadPoolExecutor(os.cpu_count()) as pool,
    ):
        work = Path(temporary)
        kind = subprocess.run(["stat", "-f", "-c", "%T", work], capture_output=True, text=True).stdout.strip()
        print(f"inputs and outputs in {work} (file system: {kind})")
        if "macho" in chosen:
            bench_macho(work, arguments.size_mib, arguments.runs, pool, identity)
        if "bundle" in chosen:
            bench_bundle(work, arguments.files, arguments.runs, pool, identity)
        if "dmg" in chosen:
            bench_dmg(work, arguments.dmg_size_mib, arguments.runs, pool, identity)


if __name__ == "__main__":
    main()
