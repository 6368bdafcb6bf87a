"""ARM without hardware: the published artifacts verified under aarch64 user-mode emulation.

`check_path` runs `export.runtime.verify` (TF-free) on x86 and, under qemu, on an arm64 Debian root file
system with the aarch64 wheels of the same runtime versions, for each CPU model; it compares them
per file (max abs diff, rel L2, whether the outputs are the same bits). A file failing its gate on
an ARM model passes only when its manifest says so in `deployment.arm` (measured at export time
by `measure`, `python -m export --arm`, before the manifest is written): the gate is never
widened. `python -m export.arm` is the command line (`make verify-arm`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from export.arm.cache import Emulator, provision, runtime_versions
from export.arm.emulate import DEFAULT_CPUS, check_cpu, probe, verify
from export.caches import cache_dir
from export.errors import EmulatorError
from export.runtime.manifest import write_manifest
from export.runtime.verify import find_manifests, verify_manifest, verify_path

# The root file system and the wheels: under the user's cache folder, never the work tree (the
# root file system holds absolute symlinks into the host). XATTN_CACHE_DIR moves it.
DEFAULT_CACHE = cache_dir("arm")


@dataclass
class FileReport:
    """One manifest: its x86 result, and per CPU model the emulated one."""

    manifest: str
    artifact: str
    format: str | None
    tolerance: dict
    x86: dict
    arm: dict = field(default_factory=dict)  # cpu -> verify result (export.runtime.verify --json)
    declared: dict = field(default_factory=dict)  # cpu -> the manifest's deployment.arm entry
    problems: list = field(default_factory=list)  # why this file fails the ARM check

    def as_json(self) -> dict:
        cpus = {}
        for cpu, r in self.arm.items():
            cpus[cpu] = {"status": r["status"], "reason": r["reason"], "metrics": r["metrics"],
                         "outputs_sha256": r["outputs_sha256"],
                         "same_bits_as_x86": _same_bits(r, self.x86),
                         "declared_within_gate": (self.declared.get(cpu) or {}).get("within_gate")}
        return {"manifest": self.manifest, "artifact": self.artifact, "format": self.format,
                "gate": self.tolerance,
                "x86": {k: self.x86[k] for k in ("status", "metrics", "outputs_sha256")},
                "cpus": cpus, "bits_differ_between_cpus": self.bits_differ_between_cpus,
                "problems": self.problems}

    @property
    def bits_differ_between_cpus(self) -> bool | None:
        digests = {r["outputs_sha256"] for r in self.arm.values() if r["outputs_sha256"]}
        return None if not digests else len(digests) > 1


def _same_bits(a: dict, b: dict) -> bool | None:
    if not a.get("outputs_sha256") or not b.get("outputs_sha256"):
        return None
    return a["outputs_sha256"] == b["outputs_sha256"]


def emulator_version(emulator: Emulator) -> str:
    try:
        out = subprocess.run([emulator.qemu, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return os.path.basename(emulator.qemu)
    first = out.splitlines()[0] if out.strip() else os.path.basename(emulator.qemu)
    return f"{first.strip()} (user mode)"


def run_all(emulator: Emulator, path: str, cpus: tuple[str, ...]) -> tuple[dict, dict]:
    """(cpu -> probe, cpu -> {manifest name -> emulated result}) for every model in `cpus`."""
    probes, results = {}, {}
    for cpu in cpus:
        probes[cpu] = probe(emulator, cpu)
        if probes[cpu]["machine"] != "aarch64" or probes[cpu]["heavy_imports"]:
            raise EmulatorError(f"-cpu {cpu}: the guest says machine={probes[cpu]['machine']!r}, "
                                f"heavy imports {probes[cpu]['heavy_imports']} (want aarch64, none)")
        where = probes[cpu].get("export") or "?"
        if not os.path.abspath(where).startswith(os.path.abspath(emulator.site) + os.sep):
            raise EmulatorError(f"-cpu {cpu}: the guest imported export from {where}, not from the "
                                f"xattn wheel installed in {emulator.site}")
        results[cpu] = verify(emulator, path, cpu)
    return probes, results


def check_path(path: str, *, cpus: tuple[str, ...] = DEFAULT_CPUS, cache: str = DEFAULT_CACHE,
               mirror: str | None = None, index_url: str | None = None) -> dict:
    """Verify `path` on x86 and under emulation for each CPU model; the report (a dict).

    A file fails when it fails on x86, or on an ARM model without its manifest declaring it
    (`deployment.arm.cpus[model].within_gate` false), or gives no result under emulation.

    Raises:
        UsageError: nothing to verify at `path`, an unknown CPU model.
        ProvisionError: qemu/mmdebstrap missing, a download failed. EmulatorError: the guest crashed.
    """
    cpus = tuple(check_cpu(c) for c in cpus)
    find_manifests(path)  # nothing to verify: a usage error before any download
    emulator = provision(cache, mirror=mirror, index_url=index_url)
    x86 = {os.path.basename(r.manifest): r.as_json() for r in verify_path(path)}
    probes, emulated = run_all(emulator, path, cpus)
    files = []
    for name, base in x86.items():
        report = FileReport(manifest=name, artifact=base["artifact"], format=base["format"],
                            tolerance=base["tolerance"], x86=base)
        declared = _declared(os.path.join(path if os.path.isdir(path) else os.path.dirname(path), name))
        if base["status"] == "failed":
            report.problems.append(f"x86: {base['reason']}")
        for cpu in cpus:
            result = emulated[cpu].get(name)
            if result is None:
                report.problems.append(f"-cpu {cpu}: no result")
                continue
            report.arm[cpu] = result
            report.declared[cpu] = declared.get(cpu)
            if result["status"] == "failed" and not _excused(result, declared.get(cpu)):
                report.problems.append(f"-cpu {cpu}: {result['reason']} (not declared in the "
                                       "manifest's deployment.arm)")
        files.append(report)
    return {"emulator": emulator_version(emulator), "runtimes": runtime_versions(),
            "cpus": probes, "path": path, "files": [f.as_json() for f in files],
            "failed": sum(bool(f.problems) for f in files)}


def _excused(result: dict, declared: dict | None) -> bool:
    """A failure the manifest declares: the outputs were compared (integrity, loading and running
    passed: the metrics exist) and `deployment.arm` says this model is beyond the gate."""
    return bool(result["metrics"]) and isinstance(declared, dict) and declared.get("within_gate") is False


def _declared(manifest_path: str) -> dict:
    try:
        with open(manifest_path, encoding="utf-8") as f:
            arm = ((json.load(f).get("deployment") or {}).get("arm") or {})
        return arm.get("cpus") or {}
    except (OSError, ValueError, AttributeError):
        return {}  # export.runtime.verify reports a damaged manifest


def measure(stage: str, manifests: dict[str, dict], *, cpus: tuple[str, ...] = DEFAULT_CPUS,
            cache: str = DEFAULT_CACHE) -> dict[str, dict]:
    """The `deployment.arm` entry of each staged set with a device runtime (export.pipeline, `--arm`).

    Runs on the staged files before any manifest is written: the verifier reads manifests, so
    drafts of `manifests` (without the entry) go into a private folder beside hard links to the
    staged files, removed afterwards. A file beyond its gate on an ARM model is recorded
    (`within_gate: false`, its max abs diff and rel L2), not refused: the gate stays the gate,
    and the manifest tells where the file does not meet it.

    Args:
        stage: the staging folder holding every file the manifests name.
        manifests: manifest name -> its manifest, complete but for `deployment.arm`; those without
            `deployment` (SavedModel: no device runtime) are left out.

    Returns:
        manifest name -> its `deployment.arm` entry.

    Raises:
        UsageError: an unknown CPU model. ProvisionError, EmulatorError: as `check_path`.
    """
    cpus = tuple(check_cpu(c) for c in cpus)
    wanted = {name: m for name, m in manifests.items() if m.get("deployment") is not None}
    if not wanted:
        return {}
    emulator = provision(cache)
    with _drafts(stage, wanted) as folder:
        probes, emulated = run_all(emulator, folder, cpus)
        x86 = {name: verify_manifest(os.path.join(folder, name)).as_json() for name in wanted}
    versions = runtime_versions()
    entries = {}
    for name in wanted:
        entry = {"emulator": emulator_version(emulator), "runtimes": versions, "cpus": {}}
        for cpu in cpus:
            got = emulated[cpu].get(name)
            if got is None:
                raise EmulatorError(f"-cpu {cpu}: no result for {name}")
            entry["cpus"][cpu] = {
                "features": probes[cpu]["features"],
                "max_abs": got["metrics"].get("max_abs"), "rel_l2": got["metrics"].get("rel_l2"),
                "gate": got["tolerance"], "within_gate": got["status"] == "passed",
                **({"reason": got["reason"]} if got["status"] != "passed" else {}),
                "same_bits_as_x86": _same_bits(got, x86[name]),
            }
        entries[name] = entry
    return entries


@contextlib.contextmanager
def _drafts(stage: str, manifests: dict[str, dict]) -> Iterator[str]:
    """A private folder inside `stage`: hard links to its files (copies where links fail) and
    the draft `manifests`; removed on exit. Nothing in it is published."""
    folder = tempfile.mkdtemp(prefix=".arm-", dir=stage)
    try:
        for entry in os.listdir(stage):
            src, dst = os.path.join(stage, entry), os.path.join(folder, entry)
            if entry.startswith("."):  # the stage's lock, this folder
                continue
            if os.path.isdir(src):
                shutil.copytree(src, dst, copy_function=_link)
            else:
                _link(src, dst)
        for name, manifest in manifests.items():
            write_manifest(os.path.join(folder, name), manifest)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


__all__ = ["DEFAULT_CACHE", "DEFAULT_CPUS", "FileReport", "check_path", "measure"]
