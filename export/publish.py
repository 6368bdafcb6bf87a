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
    """sha256 of a file's bytes; of a folder, its tree: every name and every file's bytes.

    A folder hashes, in sorted relative POSIX path order, `dir\\0<path>\\0` for each sub-folder
    and `file\\0<path>\\0<size>\\0<bytes>` for each file: a renamed, moved or added file (an empty
    one included) changes the digest, not only changed bytes.
    """
    if not os.path.isdir(path):
        digest = hashlib.sha256()
        _hash_file(digest, path)
        return digest.hexdigest()
    entries = []  # (relative POSIX path, is a folder, path on this system)
    for root, dirs, names in os.walk(path):
        for name, is_dir in [(d, True) for d in dirs] + [(n, False) for n in names]:
            full = os.path.join(root, name)
            entries.append((_posix(os.path.relpath(full, path)), is_dir, full))
    digest = hashlib.sha256()
    for rel, is_dir, full in sorted(entries):
        name = rel.encode(errors="surrogateescape")  # UTF-8; a name that is not UTF-8: its bytes
        if is_dir:
            digest.update(b"dir\0" + name + b"\0")
        else:
            digest.update(b"file\0" + name + b"\0" + str(os.path.getsize(full)).encode() + b"\0")
            _hash_file(digest, full)
    return digest.hexdigest()


def _posix(relative: str) -> str:
    return relative.replace(os.sep, "/")


def _hash_file(digest, path: str) -> None:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):  # 1 MiB at a time: a SavedModel's variables can be GBs
            digest.update(block)


def size_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(path) for n in names
        )
    return os.path.getsize(path)


def write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed .npz (np.load-able with allow_pickle=False) with reproducible bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(arrays):
            array = np.asarray(arrays[name])
            if array.dtype.hasobject:  # object arrays, or structured ones with an object field
                raise ValueError(f"refusing to write object array {name!r}")
            buffer, contiguous = io.BytesIO(), np.ascontiguousarray(array)
            # allow_pickle=False is a second lock: numpy reads it only for the dtypes refused above.
            np.lib.format.write_array(buffer, contiguous, allow_pickle=False)  # pragma: no mutate
            # Every header field fixed (writestr takes them from the ZipInfo, not from ZipFile).
            info = zipfile.ZipInfo(f"{name}.npy")
            info.date_time = _ZIP_DATE
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3  # made on Unix, whatever system writes it (ZipInfo's default varies)
            info.external_attr = 0o644 << 16  # -rw-r--r--
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
        ("ai-edge-litert", "ai-edge-litert"), ("tflite-micro", "tflite-micro"), ("numpy", "numpy"),
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


# -- staging and publishing ---------------------------------------------------------------------


# The folder lock: the same-name guard and the publish of one export are one critical section,
# and staging folders are created and judged dead under it.
LOCK_NAME = ".xattn.lock"
# Inside each staging folder: held (flock) by the exporting process for the folder's lifetime.
STAGE_LOCK_NAME = ".xattn-stage.lock"


@contextlib.contextmanager
def folder_lock(output_dir: str) -> Iterator[None]:
    """An exclusive OS lock (flock) on `output_dir`/.xattn.lock, held for the `with` block.

    flock is released by the kernel when its holder dies (kill -9 included), works across PID
    namespaces (containers sharing the folder), and the lock file is never removed (removing it
    would let two processes lock two different files).
    """
    import fcntl  # lazy: POSIX only; export.runtime.verify imports this module on any system

    # O_NOFOLLOW: a link planted at the lock's name created its target outside --output-dir
    # (ELOOP instead: OutputDirError, exit 5).
    fd = os.open(os.path.join(output_dir, LOCK_NAME),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_is_free(path: str) -> bool:
    """True when no live process holds an flock on `path` (or it is missing: never locked)."""
    import fcntl  # lazy: POSIX only; export.runtime.verify imports this module on any system

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def clean_stale(output_dir: str) -> list[str]:
    """Remove staging/trash folders of exports that died; call it holding `folder_lock`.

    A staging folder is alive while its process holds the flock on the lock file inside it, in
    any PID namespace; a PID says nothing about a process in another container. Staging folders
    are created and locked under the folder lock, and trash folders live only inside it, so under
    that lock a staging folder whose lock is free, and any trash folder, belongs to a dead export.
    """
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for entry in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, entry)
        if entry.startswith(TRASH_PREFIX) or (
            entry.startswith(STAGING_PREFIX) and os.path.isdir(path)
            and _lock_is_free(os.path.join(path, STAGE_LOCK_NAME))
        ):
            shutil.rmtree(path, ignore_errors=True)  # one that stays is tried again next time
            if not os.path.lexists(path):
                removed.append(entry)
    if removed:
        log.debug("removed stale folders of killed exports: %s", ", ".join(removed))
    return removed


@contextlib.contextmanager
def staging(output_dir: str) -> Iterator[str]:
    """A private folder inside `output_dir`, locked by this process; removed on exit whatever happens."""
    import fcntl  # lazy: POSIX only; export.runtime.verify imports this module on any system

    os.makedirs(output_dir, exist_ok=True)
    with folder_lock(output_dir):
        clean_stale(output_dir)
        path = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=output_dir)
        try:
            fd = os.open(os.path.join(path, STAGE_LOCK_NAME),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def publish(stage: str, output_dir: str, names: list[str]) -> list[str]:
    """Rename each staged name into `output_dir`, in order; files replace atomically.

    A folder (SavedModel) cannot replace a non-empty folder in one rename: the old one is first
    renamed aside into a trash folder, then the new one in, then the trash removed.
    """
    published = []
    for name in names:
        src = os.path.join(stage, name)
        dst = os.path.join(output_dir, name)
        if os.path.isdir(src) and os.path.lexists(dst):
            trash = tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{os.getpid()}-", dir=output_dir)
            os.replace(dst, os.path.join(trash, name))
            os.replace(src, dst)
            shutil.rmtree(trash, ignore_errors=True)  # if it stays, the next export's clean_stale
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
