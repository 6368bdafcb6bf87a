"""What the emulated ARM check runs on: an arm64 Debian root file system, and this project's wheel
installed with `[runtime]` beside the aarch64 wheels of its dependencies.

The guest imports the installed wheel, never a source tree: `export.arm` works the same from a
checkout and from `pip install 'xattn[runtime]'`. The wheel is made from the installed
distribution (its metadata and its packages' files, with fixed timestamps: the same code gives
the same bytes), so the `site` step, keyed by the wheel's sha256, is redone only when the code is.

Everything is cached under one folder (`export.caches.cache_dir("arm")` by default:
`~/.cache/xattn/arm`), one step at a time, under a lock on the folder (two exports with `--arm`
provision it in turn): a step builds into `<step>.partial`, renames it into place and only then
writes `<step>.stamp` (what it was made from). A rerun trusts a step only when its stamp
matches; a failed download leaves a `.partial` that the next run deletes, never a half-made cache
it would trust.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
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
# This project: the distribution, its top-level packages (pyproject.toml's packages.find) and the
# extra the guest installs it with.
PROJECT = "xattn"
PROJECT_PACKAGES = ("xattn", "export")
EXTRA = "runtime"
# A zip entry's timestamp (the earliest zip allows): the same files give the same wheel bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Emulator:
    """A provisioned cache: the root file system, the folder `xattn[runtime]` is installed in for
    the guest (the project's wheel and the aarch64 wheels: its PYTHONPATH) and the qemu binary."""

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
                                 f"to the x86 versions (pip install '.[{EXTRA}]')") from None
    return versions


def provision(cache: str, *, mirror: str | None = None, index_url: str | None = None,
              qemu: str | None = None) -> Emulator:
    """Make (or reuse) the root file system, the wheels and the guest's install under `cache`.

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
    versions = runtime_versions()
    requirements = runtime_requirements()
    with _cache_lock(cache):
        rootfs = _step(cache, "rootfs", {"suite": SUITE, "mirror": mirror, "packages": PACKAGES},
                       lambda out: _make_rootfs(out, mirror))
        wheels = _step(cache, "wheels", {"versions": versions, "requirements": requirements,
                                         "platforms": PLATFORMS},
                       lambda out: _download_wheels(out, versions, requirements, index_url))
        project, key = _project_wheel(cache)
        site = _step(cache, "site", {"wheels": sorted(os.listdir(wheels)), "project": key},
                     lambda out: _install(out, wheels, project, versions))
    # Once it is there (an error stays one line): where it lives, and how to move it.
    log.info("cache    %s (arm64 root file system, %s and the aarch64 wheels; $%s moves it)",
             os.path.abspath(cache), os.path.basename(project), caches.ENV)
    return Emulator(rootfs=rootfs, site=site, qemu=qemu_path)


def runtime_requirements() -> list[str]:
    """The requirements of `xattn[runtime]` as the installed distribution declares them."""
    found = []
    for requirement in _distribution().requires or []:
        spec, _, marker = requirement.partition(";")
        if re.search(rf"""extra\s*==\s*["']{EXTRA}["']""", marker):
            found.append(spec.strip())
    return found


def _distribution() -> metadata.Distribution:
    """The installed distribution: its dist-info (METADATA) before a checkout's egg-info, which
    a source tree on sys.path (pytest's pythonpath) puts first."""
    found = list(metadata.distributions(name=PROJECT))
    for dist in found:
        if dist.read_text("METADATA"):
            return dist
    if found:
        return found[0]
    raise ProvisionError(f"{PROJECT} is not installed in this Python: the ARM guest installs "
                         f"its wheel (pip install '.[{EXTRA}]')")


def build_project_wheel(folder: str) -> str:
    """The wheel of the installed `xattn` in `folder` (created); its path.

    Made from the distribution's METADATA and entry points and the files of its packages as
    imported here (a checkout's, through an editable install, or site-packages'), without
    byte-code; every entry dated 1980-01-01, in name order: the same files give the same bytes.
    """
    dist = _distribution()
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO")  # a checkout's egg-info
    if not text:
        raise ProvisionError(f"the installed {PROJECT} has no METADATA: reinstall it "
                             f"(pip install '.[{EXTRA}]')")
    version = dist.version
    info = f"{PROJECT}-{version}.dist-info"
    entries: dict[str, bytes] = {}
    for package in PROJECT_PACKAGES:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ProvisionError(f"the package {package!r} of {PROJECT} cannot be found here")
        root = list(found.submodule_search_locations)[0]
        for base, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(base, name)
                arcname = "/".join([package, *os.path.relpath(path, root).split(os.sep)])
                with open(path, "rb") as f:
                    entries[arcname] = f.read()
    entries[f"{info}/METADATA"] = text.encode()
    entries[f"{info}/WHEEL"] = (f"Wheel-Version: 1.0\nGenerator: {PROJECT} export.arm\n"
                                "Root-Is-Purelib: true\nTag: py3-none-any\n").encode()
    scripts = dist.read_text("entry_points.txt")
    if scripts:
        entries[f"{info}/entry_points.txt"] = scripts.encode()
    record = "".join(f"{name},sha256={_urlsafe_digest(data)},{len(data)}\n"
                     for name, data in sorted(entries.items()))
    entries[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{PROJECT}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(entries.items()):
            entry = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data)
    return path


def _urlsafe_digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _project_wheel(cache: str) -> tuple[str, dict]:
    """The project's wheel under `cache/project`, remade there only when its bytes change; its
    path and `{"wheel": name, "sha256": digest}` (the key of the steps that use it)."""
    build = os.path.join(cache, "project.build")
    shutil.rmtree(build, ignore_errors=True)
    try:
        made = build_project_wheel(build)
        key = {"wheel": os.path.basename(made), "sha256": _sha256(made)}

        def keep(out: str) -> None:
            os.makedirs(out)
            shutil.move(made, os.path.join(out, key["wheel"]))

        return os.path.join(_step(cache, "project", key, keep), key["wheel"]), key
    finally:
        shutil.rmtree(build, ignore_errors=True)


@contextlib.contextmanager
def _cache_lock(cache: str) -> Iterator[None]:
    """An OS lock on `cache` while it is provisioned (released when the process dies)."""
    import fcntl  # lazy: POSIX only, as qemu user mode is

    fd = os.open(os.path.join(cache, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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


def _platform_options() -> list[str]:
    argv = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    return argv


def _download_wheels(out: str, versions: dict[str, str], requirements: list[str],
                     index_url: str | None) -> None:
    """The aarch64 wheels of `xattn[runtime]`'s requirements, the runtimes pinned to `versions`."""
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            *_platform_options(), "--dest", out]
    if index_url:
        argv += ["--index-url", index_url]
    argv += [*requirements, *(f"{name}=={version}" for name, version in versions.items())]
    _run(argv, "downloading the aarch64 wheels (pip download)")


def install_argv(out: str, wheels: str, project: str, versions: dict[str, str]) -> list[str]:
    """pip installing `project` (a wheel) with `[runtime]` into the folder `out` for the guest:
    aarch64, CPython 3.11, from the downloaded `wheels` only (no index), without byte-code."""
    version = os.path.basename(project).split("-")[1]
    return [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-index", "--find-links", wheels, "--find-links", os.path.dirname(project),
            *_platform_options(), "--no-compile", "--target", out,
            f"{PROJECT}[{EXTRA}]=={version}", *(f"{name}=={v}" for name, v in versions.items())]


def _install(out: str, wheels: str, project: str, versions: dict[str, str]) -> None:
    _run(install_argv(out, wheels, project, versions),
         f"installing {os.path.basename(project)}[{EXTRA}] for the guest (pip install --target)")
