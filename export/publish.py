"""Manifests, golden vectors, the private staging folder, and the atomic publish into --output-dir.

Everything is written into a staging folder inside the output folder (same file system, so a
rename is atomic) and renamed into place only after verification. Files are published before the
manifests that describe them, so a reader never sees a manifest whose files are missing.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from importlib import metadata

import numpy as np

log = logging.getLogger("export")

STAGING_PREFIX = ".xattn-staging-"
TRASH_PREFIX = ".xattn-trash-"
# A fixed timestamp inside the golden zip: same content, same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def sha256_path(path: str) -> str:
    """sha256 of a file, or of a folder's files' bytes concatenated in sorted relative-path order."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(
            os.path.relpath(os.path.join(root, name), path)
            for root, _, names in os.walk(path)
            for name in names
        )
        paths = [os.path.join(path, f) for f in files]
    else:
        paths = [path]
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def size_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names
        )
    return os.path.getsize(path)


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed .npz (np.load-able with allow_pickle=False) with reproducible bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            array = np.asarray(arrays[name])
            if array.dtype == object:
                raise ValueError(f"refusing to write object array {name!r}")
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue())


def versions() -> dict:
    """Versions of the converters and runtimes installed here (for manifests)."""
    return dict(_installed_versions())


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple:
    # Package metadata is read from disk; it does not change while a process runs.
    out = {"python": platform.python_version()}
    for dist, key in (
        ("tensorflow-cpu", "tensorflow"), ("tensorflow", "tensorflow"), ("keras", "keras"),
        ("tf2onnx", "tf2onnx"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime"),
        ("ai-edge-litert", "ai-edge-litert"), ("numpy", "numpy"),
    ):
        if key in out:
            continue
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[key] = metadata.version(dist)
    return tuple(sorted(out.items()))


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z"
    )


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


# -- staging and publishing ---------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(output_dir: str) -> list[str]:
    """Remove staging/trash folders left by exports that died (their pid is gone)."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for entry in os.listdir(output_dir):
        if not entry.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            continue
        try:
            pid = int(entry.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)
            removed.append(entry)
    if removed:
        log.debug("removed stale folders of killed exports: %s", ", ".join(removed))
    return removed


@contextlib.contextmanager
def staging(output_dir: str) -> Iterator[str]:
    """A private folder inside `output_dir`; removed on exit whatever happens."""
    os.makedirs(output_dir, exist_ok=True)
    clean_stale(output_dir)
    path = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(stage: str, output_dir: str, names: list[str]) -> list[str]:
    """Rename each staged name into `output_dir`, in order; files replace atomically.

    A folder (SavedModel) cannot replace a non-empty folder in one rename: the old one is first
    renamed aside into a trash folder, then the new one in, then the trash removed.
    """
    published = []
    for name in names:
        src = os.path.join(stage, name)
        dst = os.path.join(output_dir, name)
        if os.path.isdir(src):
            trash = None
            if os.path.lexists(dst):
                trash = tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{os.getpid()}-", dir=output_dir)
                os.replace(dst, os.path.join(trash, name))
            os.replace(src, dst)
            if trash:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(src, dst)
        published.append(dst)
    _fsync_dir(output_dir)
    return published


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
