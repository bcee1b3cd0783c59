"""Rebuild the Mach-O binaries that `signbridge demo` puts into its sample MyApp.app.

    ./dev python scripts/build_demo_binaries.py

They are built with Debian's clang and ld64.lld (no macOS SDK), the same way the tests build their
fixtures (tests/machofixtures.py), and committed under src/signbridge/demo/demo_app/ so that the demo needs
no compiler: MyApp is a universal (x86_64 + arm64) executable, Demo a universal dylib.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from machofixtures import build_fixtures  # noqa: E402

TARGET = ROOT / "src" / "signbridge" / "demo" / "demo_app"


def main() -> None:
    with tempfile.TemporaryDirectory() as temporary:
        fixtures = build_fixtures(Path(temporary))
        TARGET.mkdir(exist_ok=True)
        for name, source in (("MyApp", "hello.universal"), ("Demo", "libdemo.universal.dylib")):
            shutil.copyfile(fixtures.path(source), TARGET / name)
            print(f"{TARGET / name}: {(TARGET / name).stat().st_size} bytes")


if __name__ == "__main__":
    main()
