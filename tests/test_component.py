"""Component packages for the demo: PackageInfo + a gzip'd odc cpio Payload, read back by bsdtar."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from defusedxml import ElementTree

from conftest import require_tool, run
from signbridge.apple.pkg.xar.archive import XarArchive
from signbridge.demo.component import build_component_package


def test_component_package_payload_extracts_with_bsdtar(tmp_path: Path) -> None:
    bsdtar = require_tool("bsdtar")
    app = tmp_path / "stage" / "MyApp.app"
    (app / "Contents" / "MacOS").mkdir(parents=True)
    (app / "Contents" / "MacOS" / "MyApp").write_bytes(os.urandom(5000))
    (app / "Contents" / "MacOS" / "MyApp").chmod(0o755)
    (app / "Contents" / "Info.plist").write_text("<plist/>")
    os.symlink("MacOS/MyApp", app / "Contents" / "link")
    package = build_component_package(app, tmp_path / "MyApp.pkg", identifier="com.example.MyApp.pkg", version="2.1")

    archive = XarArchive.open(package)
    info = ElementTree.fromstring(archive.read_data(archive.file("PackageInfo")))
    assert info.get("identifier") == "com.example.MyApp.pkg" and info.get("version") == "2.1"
    assert info.get("install-location") == "/Applications"

    out = tmp_path / "out"
    out.mkdir()
    run([bsdtar, "-xf", str(package), "-C", str(out)])
    listing = run([bsdtar, "-tvf", str(out / "Payload")]).stdout.decode()
    assert "./MyApp.app/Contents/MacOS/MyApp" in listing and "-rwxr-xr-x" in listing
    extracted = tmp_path / "payload"
    extracted.mkdir()
    subprocess.run([bsdtar, "-xf", str(out / "Payload"), "-C", str(extracted)], check=True)
    assert (extracted / "MyApp.app/Contents/MacOS/MyApp").read_bytes() == (app / "Contents/MacOS/MyApp").read_bytes()
    assert os.readlink(extracted / "MyApp.app/Contents/link") == "MacOS/MyApp"
