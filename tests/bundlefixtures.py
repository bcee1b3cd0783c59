"""Real bundles for tests, built from the Mach-O fixtures of machofixtures.py.

``build_myapp`` lays out MyApp.app: Contents/Info.plist, a universal main executable, resources
(an icon, text, en.lproj and Base.lproj strings, an omitted locversion.plist and .DS_Store, a
symbolic link), PkgInfo, and Contents/Frameworks/Demo.framework in the versioned layout
(Versions/A/Demo, Versions/A/Resources/Info.plist, Versions/Current -> A, top-level symlinks).
With ``extras`` it adds a second Mach-O executable and a script in Contents/MacOS and a plug-in
(PlugIns/Widget.bundle, binary Info.plist) that holds its own nested dylib.

``adhoc_sign_bundle`` signs a bundle ad hoc through the bundle API in the order the engine uses;
``slice_cdhash`` is the cdhash a parent bundle records for nested code.
"""

from __future__ import annotations

import os
import plistlib
import random
import shutil
from pathlib import Path

from machofixtures import MachOFixtures, sign_path
from signbridge.apple.bundle.layout import Bundle, sign_bundle_plan
from signbridge.apple.bundle.resources.writing import NestedCode, build_code_resources
from signbridge.apple.codesig.embedded_signature import read_signature
from signbridge.apple.codesig.requirements.binary import cdhash as cdhash_requirement
from signbridge.apple.codesig.requirements.text import render
from signbridge.apple.macho.constants import CPU_TYPE_ARM64
from signbridge.apple.macho.parse import parse_file
from signbridge.apple.macho.sign import SigningOptions
from signbridge.atomic import write_atomically

APP_ID = "com.example.MyApp"
FRAMEWORK_ID = "com.example.Demo"
WIDGET_ID = "com.example.Widget"

APP_INFO = {
    "CFBundleExecutable": "MyApp",
    "CFBundleIdentifier": APP_ID,
    "CFBundleName": "MyApp",
    "CFBundlePackageType": "APPL",
    "CFBundleShortVersionString": "1.0",
    "CFBundleVersion": "1",
    "LSMinimumSystemVersion": "10.15",
}
FRAMEWORK_INFO = {
    "CFBundleExecutable": "Demo",
    "CFBundleIdentifier": FRAMEWORK_ID,
    "CFBundlePackageType": "FMWK",
    "CFBundleShortVersionString": "1.0",
}
WIDGET_INFO = {
    "CFBundleExecutable": "Widget",
    "CFBundleIdentifier": WIDGET_ID,
    "CFBundlePackageType": "BNDL",
}


def build_myapp(directory: Path, fx: MachOFixtures, *, extras: bool = False) -> Path:
    app = directory / "MyApp.app"
    contents = app / "Contents"
    resources = contents / "Resources"
    (contents / "MacOS").mkdir(parents=True)
    (resources / "en.lproj").mkdir(parents=True)
    (resources / "Base.lproj").mkdir()
    (contents / "Info.plist").write_bytes(plistlib.dumps(APP_INFO))
    (contents / "PkgInfo").write_bytes(b"APPL????")
    _install(fx.path("exe.universal"), contents / "MacOS" / "MyApp")
    (resources / "AppIcon.icns").write_bytes(random.Random(7).randbytes(64 * 1024))
    (resources / "data.txt").write_text("sealed resource\n")
    (resources / "en.lproj" / "Localizable.strings").write_text('"hello" = "Hello";\n')
    (resources / "en.lproj" / "locversion.plist").write_bytes(plistlib.dumps({"LprojVersion": "1"}))
    (resources / "Base.lproj" / "Main.strings").write_text('"title" = "MyApp";\n')
    (resources / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    os.symlink("data.txt", resources / "current.txt")
    build_framework(contents / "Frameworks", fx)
    if extras:
        _install(fx.path("hello.universal"), contents / "MacOS" / "helper")
        (contents / "MacOS" / "launch.sh").write_text("#!/bin/sh\nexec ./MyApp\n")
        os.chmod(contents / "MacOS" / "launch.sh", 0o755)
        widget = contents / "PlugIns" / "Widget.bundle" / "Contents"
        (widget / "MacOS").mkdir(parents=True)
        (widget / "Resources").mkdir()
        (widget / "Frameworks").mkdir()
        (widget / "Info.plist").write_bytes(plistlib.dumps(WIDGET_INFO, fmt=plistlib.FMT_BINARY))
        _install(fx.path("plugin.arm64.bundle"), widget / "MacOS" / "Widget")
        _install(fx.path("libdemo.arm64.dylib"), widget / "Frameworks" / "libinner.dylib")
        (widget / "Resources" / "widget.txt").write_text("widget resource\n")
    return app


def build_framework(directory: Path, fx: MachOFixtures) -> Path:
    framework = directory / "Demo.framework"
    version = framework / "Versions" / "A"
    (version / "Resources").mkdir(parents=True)
    _install(fx.path("libdemo.universal.dylib"), version / "Demo")
    (version / "Resources" / "Info.plist").write_bytes(plistlib.dumps(FRAMEWORK_INFO))
    (version / "Resources" / "notes.txt").write_text("framework resource\n")
    os.symlink("A", framework / "Versions" / "Current")
    os.symlink("Versions/Current/Demo", framework / "Demo")
    os.symlink("Versions/Current/Resources", framework / "Resources")
    return framework


def _install(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    os.chmod(target, 0o755)


def slice_cdhash(path: Path) -> bytes:
    """The cdhash a parent records for nested code: the arm64 slice's, else the first slice's."""
    parsed = parse_file(path.read_bytes())
    chosen = next((s for s in parsed.slices if s.cputype == CPU_TYPE_ARM64), parsed.slices[0])
    signature = read_signature(chosen)
    if signature is None:
        raise AssertionError(f"{path} is not signed")
    return signature.code_directory.cdhash()


def adhoc_sign_bundle(root: Path) -> dict[Path, NestedCode]:
    """Sign a bundle and all its nested code ad hoc, innermost first; returns what each item recorded."""
    done: dict[Path, NestedCode] = {}
    for item in sign_bundle_plan(Bundle.open(root)):
        if item.is_dir():
            bundle = Bundle.open(item)
            nested = {path: code for path, code in done.items() if path.is_relative_to(bundle.content_root)}
            seal = build_code_resources(bundle, nested)
            write_atomically(bundle.code_resources_path, seal, fsync=True, make_parents=True)
            options = SigningOptions(
                identifier=bundle.identifier or item.stem, info_plist=bundle.info_plist_path.read_bytes(), code_resources=seal
            )
            sign_path(bundle.executable_path, options)
            signed = bundle.executable_path
        else:
            sign_path(item, SigningOptions(identifier=item.stem))
            signed = item
        digest = slice_cdhash(signed)
        done[item] = NestedCode(digest, render(cdhash_requirement(digest)))
    return done


# --- shallow and executable-less bundles ---------------------------------------------------------

DRIVER_ID = "com.example.Driver"
FILTER_ID = "com.example.Filter"
HOST_ID = "com.example.Host"
HELPER_ID = "com.example.Host.Helper"
IOS_ID = "com.example.Pocket"
SHARE_ID = "com.example.Pocket.Share"
RESOURCE_ID = "com.example.Resources"
PROFILE = b"0\x82\x01\x00 stand-in for a CMS-signed provisioning profile\n"


def build_shallow(path: Path, source: Path, identifier: str, *, profile: str | None = None) -> Path:
    """A flat bundle: Info.plist, the executable and (optionally) a provisioning profile at its root."""
    path.mkdir(parents=True)
    name = identifier if path.suffix in (".dext", ".systemextension") else identifier.rsplit(".", 1)[-1]
    info = {"CFBundleExecutable": name, "CFBundleIdentifier": identifier, "CFBundlePackageType": "XPC!"}
    (path / "Info.plist").write_bytes(plistlib.dumps(info))
    _install(source, path / name)
    if profile:
        (path / profile).write_bytes(PROFILE)
    return path


def build_sysext_host(directory: Path, fx: MachOFixtures) -> Path:
    """Host.app (deep) carrying a DriverKit .dext and a .systemextension, both shallow, in
    Contents/Library/SystemExtensions/, each with embedded.provisionprofile, and a flat XPC
    service in Contents/XPCServices/ (nested code that the seal records by cdhash)."""
    app = directory / "Host.app"
    contents = app / "Contents"
    (contents / "MacOS").mkdir(parents=True)
    (contents / "Resources").mkdir()
    info = {"CFBundleExecutable": "Host", "CFBundleIdentifier": HOST_ID, "CFBundlePackageType": "APPL"}
    (contents / "Info.plist").write_bytes(plistlib.dumps(info))
    _install(fx.path("exe.universal"), contents / "MacOS" / "Host")
    (contents / "Resources" / "host.txt").write_text("host resource\n")
    (contents / "embedded.provisionprofile").write_bytes(PROFILE)
    extensions = contents / "Library" / "SystemExtensions"
    build_shallow(extensions / f"{DRIVER_ID}.dext", fx.path("exe.arm64"), DRIVER_ID, profile="embedded.provisionprofile")
    build_shallow(
        extensions / f"{FILTER_ID}.systemextension", fx.path("exe.x86_64"), FILTER_ID, profile="embedded.provisionprofile"
    )
    build_shallow(contents / "XPCServices" / "Helper.xpc", fx.path("exe.arm64"), HELPER_ID)
    return app


def build_ios_app(directory: Path, fx: MachOFixtures) -> Path:
    """Pocket.app laid out flat, as on iOS: Info.plist, PkgInfo, the executable,
    embedded.mobileprovision, Base.lproj, a flat app extension in PlugIns/ and a dylib in
    Frameworks/."""
    app = build_shallow(directory / "Pocket.app", fx.path("exe.arm64"), IOS_ID, profile="embedded.mobileprovision")
    (app / "PkgInfo").write_text("APPL????")
    (app / "Base.lproj").mkdir()
    (app / "Base.lproj" / "Main.strings").write_text('"title" = "Pocket";\n')
    (app / "en.lproj").mkdir()
    (app / "en.lproj" / "locversion.plist").write_bytes(plistlib.dumps({"LprojLocale": "en"}))
    build_shallow(app / "PlugIns" / "Share.appex", fx.path("exe.arm64"), SHARE_ID, profile="embedded.mobileprovision")
    (app / "Frameworks").mkdir()
    _install(fx.path("libdemo.arm64.dylib"), app / "Frameworks" / "libswiftDemo.dylib")
    return app


def build_resource_bundle(directory: Path) -> Path:
    """Resources.bundle: Contents/Info.plist without CFBundleExecutable, and resources."""
    bundle = directory / "Resources.bundle"
    (bundle / "Contents" / "Resources").mkdir(parents=True)
    info = {"CFBundleIdentifier": RESOURCE_ID, "CFBundlePackageType": "BNDL", "CFBundleVersion": "1.0"}
    (bundle / "Contents" / "Info.plist").write_bytes(plistlib.dumps(info))
    (bundle / "Contents" / "Resources" / "key.pem").write_text("-----BEGIN PUBLIC KEY-----\n")
    return bundle
