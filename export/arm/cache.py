"""What the emulated ARM check runs on: an arm64 Debian root file system and aarch64 wheels.

Everything is cached under one folder (`export.caches.cache_dir("arm")` by default:
`~/.cache/xattn/arm`), one step at a time: a step builds
into `<step>.partial`, renames it into place and only then writes `<step>.stamp` (what it was made
from). A rerun trusts a step only when its stamp matches; a failed download leaves a `.partial`
that the next run deletes, never a half-made cache it would trust.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata

from export import caches
from export.errors import ProvisionError, one_line

log = logging.getLogger("export")

QEMU = "qemu-aarch64-static"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The interpreter and the shared libraries the wheels load; `--variant=extract` unpacks them
# without running maintainer scripts (no binfmt, no root needed inside).
PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libpython3.11-minimal", "libc6",
            "zlib1g", "libexpat1", "libffi8", "libstdc++6", "libgcc-s1")
GUEST_PYTHON = "usr/bin/python3.11"
# The runtimes the verifier needs, pinned to the versions installed here: x86 and aarch64 then
# differ in the machine only. Their pure-Python dependencies come along (pip resolves them).
RUNTIMES = ("numpy", "onnxruntime", "ai-edge-litert")
# Bookworm's glibc is 2.36; ai-edge-litert 2.x ships manylinux_2_27 aarch64 wheels only, which
# `--platform manylinux2014_aarch64` alone does not match (pip then falls back to 1.4.0).
PLATFORMS = ("manylinux2014_aarch64",) + tuple(f"manylinux_2_{v}_aarch64" for v in range(17, 37))


@dataclass(frozen=True)
class Emulator:
    """A provisioned cache: the root file system, the unpacked wheels and the qemu binary."""

    rootfs: str
    site: str
    qemu: str

    @property
    def python(self) -> str:
        return os.path.join(self.rootfs, GUEST_PYTHON)


def find_qemu(qemu: str | None = None) -> str:
    """The qemu-aarch64-static binary (or `qemu`); ProvisionError when it is not there."""
    wanted = qemu or os.environ.get("XATTN_ARM_QEMU") or QEMU
    found = shutil.which(wanted)
    if not found:
        raise ProvisionError(f"{wanted} not found: install qemu-user-static "
                             "(make verify-arm does: apt-get install qemu-user-static mmdebstrap)")
    return found


def runtime_versions() -> dict[str, str]:
    """The versions of RUNTIMES installed in this Python, to pin the aarch64 wheels to."""
    versions = {}
    for name in RUNTIMES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise ProvisionError(f"{name} is not installed here; the aarch64 wheels are pinned "
                                 "to the x86 versions (pip install -e '.[test]')") from None
    return versions


def provision(cache: str, *, mirror: str | None = None, index_url: str | None = None,
              qemu: str | None = None) -> Emulator:
    """Make (or reuse) the root file system and the wheels under `cache`.

    Args:
        cache: the cache folder (`~/.cache/xattn/arm`: export.arm.DEFAULT_CACHE).
        mirror: the Debian mirror for mmdebstrap; None reads XATTN_ARM_MIRROR, else deb.debian.org.
        index_url: pip's index for the wheels; None reads XATTN_ARM_INDEX_URL, else pip's own.
        qemu: the emulator binary; None reads XATTN_ARM_QEMU, else qemu-aarch64-static.

    Raises:
        ProvisionError: a tool is missing or a download failed (one line: which, and why).
    """
    qemu_path = find_qemu(qemu)
    os.makedirs(cache, exist_ok=True)
    mirror = mirror or os.environ.get("XATTN_ARM_MIRROR") or DEFAULT_MIRROR
    index_url = index_url or os.environ.get("XATTN_ARM_INDEX_URL") or None
    rootfs = _step(cache, "rootfs", {"suite": SUITE, "mirror": mirror, "packages": PACKAGES},
                   lambda out: _make_rootfs(out, mirror))
    versions = runtime_versions()
    wheels = _step(cache, "wheels", {"versions": versions, "platforms": PLATFORMS},
                   lambda out: _download_wheels(out, versions, index_url))
    site = _step(cache, "site", {"wheels": sorted(os.listdir(wheels))},
                 lambda out: _unpack(wheels, out))
    # Once it is there (an error stays one line): where it lives, and how to move it.
    log.info("cache    %s (arm64 root file system, aarch64 wheels; $%s moves it)",
             os.path.abspath(cache), caches.ENV)
    return Emulator(rootfs=rootfs, site=site, qemu=qemu_path)


def _step(cache: str, name: str, key: dict, make) -> str:
    """Run `make(partial_folder)` unless `<name>.stamp` records the same `key`; the folder."""
    final = os.path.join(cache, name)
    stamp = os.path.join(cache, f"{name}.stamp")
    key = json.loads(json.dumps(key))  # tuples as lists, as the stamp reads back
    try:
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == key and os.path.isdir(final):
                return final
    except (OSError, ValueError):
        pass
    partial = final + ".partial"
    for stale in (stamp, partial, final):
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        elif os.path.lexists(stale):
            os.remove(stale)
    try:
        make(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, final)
    with open(stamp + ".tmp", "w", encoding="utf-8") as f:
        json.dump(key, f)
    os.replace(stamp + ".tmp", stamp)
    return final


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace")
    except FileNotFoundError:
        raise ProvisionError(f"{what}: {argv[0]} not found (make verify-arm installs it: "
                             "apt-get install qemu-user-static mmdebstrap)") from None
    if done.returncode:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        # The first error says why (apt: "E: Failed to fetch ..."); the last, that it stopped.
        errors = [ln for ln in lines if ln.startswith(("E:", "ERROR"))] or lines[-1:] or ["no output"]
        raise ProvisionError(f"{what} failed (exit {done.returncode}): {one_line(errors[0], 240)}")


def _make_rootfs(out: str, mirror: str) -> None:
    tool = shutil.which(os.environ.get("XATTN_ARM_MMDEBSTRAP") or "mmdebstrap")
    if not tool:
        raise ProvisionError("mmdebstrap not found: make verify-arm installs it "
                             "(apt-get install qemu-user-static mmdebstrap)")
    _run([tool, "--arch=arm64", "--variant=extract", f"--include={','.join(PACKAGES)}",
          SUITE, out, mirror], f"the arm64 {SUITE} root file system (mmdebstrap from {mirror})")
    if not os.path.isfile(os.path.join(out, GUEST_PYTHON)):
        raise ProvisionError(f"the arm64 root file system from {mirror} has no {GUEST_PYTHON}")


def _download_wheels(out: str, versions: dict[str, str], index_url: str | None) -> None:
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
            "--dest", out]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    if index_url:
        argv += ["--index-url", index_url]
    argv += [f"{name}=={version}" for name, version in versions.items()]
    _run(argv, "downloading the aarch64 wheels (pip download)")


def _unpack(wheels: str, out: str) -> None:
    os.makedirs(out)
    for name in sorted(os.listdir(wheels)):
        if name.endswith(".whl"):
            try:
                with zipfile.ZipFile(os.path.join(wheels, name)) as archive:
                    archive.extractall(out)
            except (OSError, zipfile.BadZipFile) as e:
                raise ProvisionError(f"cannot unpack {name}: {one_line(str(e))}") from e
