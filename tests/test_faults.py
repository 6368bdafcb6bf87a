"""Nothing lost under faults (issue 7): `kill -9` mid-export, a failed verification, concurrent
exports into one folder; stale staging folders are cleaned; typed errors carry their numbers.

Earlier artifacts come from the session `artifact_factory` (copied: these tests change folders).
The exports that must run as separate processes (killed, concurrent) are small configurations.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from export import cli, publish, reference
from export.errors import (
    CalibrationError,
    ConversionError,
    ExportError,
    GraphCheckError,
    InputError,
    ManifestError,
    ParityError,
    SpecError,
    UsageError,
    WeightsError,
)
from export.formats import FORMAT_NAMES, get_format
from export.pipeline import ExportRequest, export_artifacts
from export.runtime import verify
from export.spec import ArtifactSpec

FORMATS = ("savedmodel", "tflite", "onnx")
# test_export.py's SMALL configuration: shared through the session factory.
SMALL = dict(units=32, heads=2, query_len=12, query_features=16, kv_len=5, kv_features=24)
SMALL_FLAGS = ["--units", "32", "--heads", "2", "--query-len", "12", "--query-features", "16",
               "--kv-len", "5", "--kv-features", "24"]
# Three different configurations exported at once into one folder.
CONCURRENT = {
    "u8-h2-q3x5-kv4x6": ["--units", "8", "--heads", "2", "--query-len", "3", "--kv-len", "4",
                         "--query-features", "5", "--kv-features", "6"],
    "u4-h1-q2x3-kv3x2": ["--units", "4", "--heads", "1", "--query-len", "2", "--kv-len", "3",
                         "--query-features", "3", "--kv-features", "2"],
    "u8-h4-q5x4-kv2x4-vmask": ["--units", "8", "--heads", "4", "--query-len", "5", "--kv-len", "2",
                               "--query-features", "4", "--kv-features", "4", "--value-mask"],
}
PROCESS_TIMEOUT = 300


def snapshot(folder: str) -> dict[str, str]:
    """relative path -> sha256 of every file, staging/trash folders left out."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith((publish.STAGING_PREFIX, publish.TRASH_PREFIX))]
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


def leftovers(folder: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith((publish.STAGING_PREFIX, publish.TRASH_PREFIX))]


def specs(**fields) -> dict[str, ArtifactSpec]:
    return {fmt: ArtifactSpec(**fields, batch=get_format(fmt).default_batch) for fmt in FORMATS}


@pytest.fixture()
def earlier(artifact_factory, tmp_path):
    """A folder holding a published SMALL export (seed 0) and the sha256 of every file in it."""
    out, _ = artifact_factory(**SMALL)
    folder = str(tmp_path / "out")
    shutil.copytree(out, folder, symlinks=True)
    return folder, snapshot(folder)


def test_kill_9_mid_export_loses_nothing_and_the_next_export_cleans_up(earlier):
    folder, before = earlier
    # Same names as the earlier files (other weights): a partial publish would show.
    proc = subprocess.Popen(
        [sys.executable, "-m", "export", *SMALL_FLAGS, "--seed", "1", "--output-dir", folder,
         "--quiet"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        stage = None
        while time.monotonic() < deadline and proc.poll() is None:
            staged = [n for n in leftovers(folder) if n.startswith(publish.STAGING_PREFIX)]
            # Wait until it writes into its staging folder: the export is under way.
            if staged and os.listdir(os.path.join(folder, staged[0])):
                stage = staged[0]
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and stage is None:
            proc.kill()
        proc.wait(timeout=60)
    assert stage is not None, f"the export ended before it was killed: {proc.stderr.read()!r}"
    assert proc.returncode == -signal.SIGKILL
    proc.stderr.close()

    assert snapshot(folder) == before  # byte-identical, and no new file under a final name
    assert leftovers(folder) == [stage]  # the killed process could not clean up after itself
    assert all(r.status == "passed" for r in verify.verify_path(folder))

    # The next export (another process: this one) removes the dead process's staging folder.
    results = export_artifacts(ExportRequest(specs=specs(**SMALL), output_dir=folder, seed=1))
    assert leftovers(folder) == []
    after = snapshot(folder)
    assert sorted(after) == sorted(before)
    for r in results:  # seed 1 replaced seed 0's files
        if r.format != "savedmodel":
            assert after[os.path.basename(r.path)] != before[os.path.basename(r.path)]
    assert all(r.status == "passed" for r in verify.verify_path(folder))


def test_clean_stale_removes_only_dead_processes_folders(tmp_path):
    # Alive = a process holds the flock on the staging folder's lock file (any PID namespace).
    holder = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    names = {
        "dead": f"{publish.STAGING_PREFIX}1-abc",  # its lock file is there, nobody holds it
        "dead-trash": f"{publish.TRASH_PREFIX}1-def",
        "alive": f"{publish.STAGING_PREFIX}1-ghi",
        "no-lock": f"{publish.STAGING_PREFIX}xyz",  # killed before it took its lock
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial.onnx").write_bytes(b"half a file")
    (tmp_path / names["dead"] / publish.STAGE_LOCK_NAME).write_bytes(b"")
    (tmp_path / "model.onnx").write_bytes(b"published")
    alive = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / names["alive"] / publish.STAGE_LOCK_NAME)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert alive.stdout.readline().strip() == "locked"
        with publish.staging(str(tmp_path)) as own:  # cleans under the folder lock
            assert os.path.isdir(own)
            kept = sorted(os.listdir(tmp_path))
            assert kept == sorted([names["alive"], os.path.basename(own), "model.onnx",
                                   publish.LOCK_NAME])
            assert publish.clean_stale(str(tmp_path)) == []  # its own folder is alive too
    finally:
        alive.kill()
        alive.wait()
        alive.stdout.close()
    # Its holder gone, the folder is dead.
    assert publish.clean_stale(str(tmp_path)) == [names["alive"]]


def test_failed_verification_publishes_nothing(earlier):
    folder, before = earlier
    with pytest.raises(ParityError) as e:
        export_artifacts(ExportRequest(specs=specs(**SMALL), output_dir=folder, seed=1, atol=1e-12))
    # The message gives the artifact, the measured difference and the tolerance.
    message = str(e.value)
    assert re.search(r"xattn_u32_h2_q12x16_kv5x24\S* ?: max abs diff \d", message), message
    assert "atol=1e-12" in message
    assert snapshot(folder) == before
    assert leftovers(folder) == []


def test_concurrent_exports_of_different_configurations(earlier):
    folder, before = earlier
    procs = {
        cid: subprocess.Popen(
            [sys.executable, "-m", "export", *flags, "--output-dir", folder, "--quiet"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for cid, flags in CONCURRENT.items()
    }
    for cid, proc in procs.items():
        _, err = proc.communicate(timeout=PROCESS_TIMEOUT)
        assert proc.returncode == 0, f"{cid}: {err}"
    results = verify.verify_path(folder)
    # the earlier export (FORMATS) and three `python -m export` runs (every registered format)
    assert len(results) == len(FORMATS) + len(FORMAT_NAMES) * len(CONCURRENT)
    assert all(r.status == "passed" for r in results), [r.line() for r in results if r.failed]
    after = snapshot(folder)
    assert {k: after[k] for k in before} == before
    assert leftovers(folder) == []


# -- typed errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [
    SpecError, WeightsError, CalibrationError, ConversionError, ParityError, GraphCheckError,
    ManifestError, InputError, UsageError,
], ids=lambda c: c.__name__)
def test_every_error_is_an_export_error_and_a_value_error(cls):
    assert issubclass(cls, ExportError) and issubclass(cls, ValueError)
    assert isinstance(cls.exit_code, int) and cls.exit_code > 0


def test_typed_errors_name_the_numbers_and_the_file(tmp_path, capsys):
    with pytest.raises(SpecError, match=r"`units`.*units=0"):
        ArtifactSpec(units=0)
    with pytest.raises(SpecError, match=r"batch=-2"):
        ArtifactSpec(batch=-2)
    missing = tmp_path / "missing.keras"
    with pytest.raises(WeightsError, match=re.escape(str(missing))):
        reference.load_keras_file(str(missing))
    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match=re.escape(str(junk)) + ".*not a zip"):
        reference.load_keras_file(str(junk))
    # Only the CLI turns them into exit codes and one line.
    out = str(tmp_path / "out")
    assert cli.main(["--weights", str(missing), "--output-dir", out, "--quiet"]) == WeightsError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "Traceback" not in err
    # A format that cannot take the flag: the parser refuses it, before any work.
    with pytest.raises(SystemExit) as exited:
        cli.main(["--batch", "dynamic", "--output-dir", out], formats=("tflite",),
                 prog="python -m export.tflite")
    assert exited.value.code == SpecError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch dynamic" in err
    assert not os.path.exists(out) or leftovers(out) == []
