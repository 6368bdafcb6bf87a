"""export/publish.py on its own: the hashes manifests carry, the golden zip's fixed bytes, the lock
files, the clean-up of dead exports' folders and the swap of a published folder (issue 17).

No export runs here: small trees in tmp_path, so that `make mutation` can afford them per mutant.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import logging
import os
import re
import zipfile

import numpy as np
import pytest

from export import publish

# sha256_path of `tree()` below; manifests on disk carry digests made this way, so the format
# (docstring of sha256_path) must not drift.
TREE_DIGEST = "1bad3aaf8195ac718feeab38e9f3da3dae1f63e4c338ef559d05280f72c8112b"


def tree(root) -> str:
    """A SavedModel-like folder: nested folders, an empty file and folder, a name with a space."""
    folder = root / "m_savedmodel"
    (folder / "variables" / "deep").mkdir(parents=True)
    (folder / "assets").mkdir()
    (folder / "saved_model.pb").write_bytes(b"graph bytes")
    (folder / "variables" / "variables.index").write_bytes(b"")
    (folder / "variables" / "deep" / "a b.data").write_bytes(b"\x00\x01" * 5)
    (folder / "fingerprint.pb").write_bytes(b"fp")
    return str(folder)


def documented_digest(folder: str) -> str:
    """The folder digest as sha256_path's docstring states it, written out independently."""
    items = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            if os.path.isdir(full):
                record = b"dir\0" + rel.encode("utf-8", "surrogateescape") + b"\0"
            else:
                with open(full, "rb") as f:
                    data = f.read()
                record = (b"file\0" + rel.encode("utf-8", "surrogateescape") + b"\0"
                          + str(len(data)).encode() + b"\0" + data)
            items.append((rel, record))
    return hashlib.sha256(b"".join(record for _, record in sorted(items))).hexdigest()


# -- sha256_path, size_bytes ---------------------------------------------------------------------


def test_folder_digest_is_the_documented_one(tmp_path):
    folder = tree(tmp_path)
    assert publish.sha256_path(folder) == documented_digest(folder) == TREE_DIGEST


@pytest.mark.parametrize("change", ["rename", "move", "empty-file", "empty-folder", "folder-to-file"])
def test_folder_digest_sees_names_not_only_bytes(tmp_path, change):
    folder = tree(tmp_path)
    before = publish.sha256_path(folder)
    if change == "rename":
        os.rename(os.path.join(folder, "fingerprint.pb"), os.path.join(folder, "fingerprint.pbx"))
    elif change == "move":
        os.rename(os.path.join(folder, "fingerprint.pb"), os.path.join(folder, "assets", "fingerprint.pb"))
    elif change == "empty-file":
        open(os.path.join(folder, "assets", "extra"), "wb").close()
    elif change == "empty-folder":
        os.mkdir(os.path.join(folder, "assets", "extra"))
    else:  # the empty folder `assets` becomes an empty file of that name
        os.rmdir(os.path.join(folder, "assets"))
        open(os.path.join(folder, "assets"), "wb").close()
    after = publish.sha256_path(folder)
    assert after != before and after == documented_digest(folder)


def test_folder_digest_of_a_name_that_is_not_utf8(tmp_path):
    """POSIX names are bytes: one that is no UTF-8 is hashed as its bytes (surrogateescape)."""
    folder = tree(tmp_path)
    try:
        fd = os.open(os.path.join(os.fsencode(folder), b"caf\xe9.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:  # some file systems refuse such names
        pytest.skip(f"this file system refuses a non-UTF-8 name: {e}")
    os.close(fd)
    assert publish.sha256_path(folder) == documented_digest(folder) != TREE_DIGEST


def test_file_digest_and_sizes(tmp_path):
    folder = tree(tmp_path)
    pb = os.path.join(folder, "saved_model.pb")
    assert publish.sha256_path(pb) == hashlib.sha256(b"graph bytes").hexdigest()
    assert publish.size_bytes(pb) == len(b"graph bytes")
    assert publish.size_bytes(folder) == len(b"graph bytes") + 10 + len(b"fp")  # files in sub-folders too


def test_files_are_hashed_in_blocks_of_at_most_1_mib(tmp_path, monkeypatch):
    """A SavedModel's variables can be gigabytes: never read whole into memory."""
    data = os.urandom((5 << 20) // 2)  # 2.5 MiB
    path = tmp_path / "variables.data"
    path.write_bytes(data)
    sizes = []
    real_open = open

    class Recording:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, size=-1):
            sizes.append(size)
            assert len(sizes) <= 4, f"still reading after the end: {sizes}"
            return self.f.read(size)

    monkeypatch.setattr(publish, "open", lambda p, mode="r": Recording(real_open(p, mode)), raising=False)
    assert publish.sha256_path(str(path)) == hashlib.sha256(data).hexdigest()
    assert sizes == [1 << 20] * 4  # three blocks, then the empty read that ends it


# -- the golden .npz -----------------------------------------------------------------------------


def test_golden_npz_has_fixed_zip_headers_and_plain_npy_entries(tmp_path):
    arrays = {"source2": np.arange(6, dtype=np.float32).reshape(2, 3),
              "output": np.array([[1.5, -2.0]], dtype=np.float64),
              "mask": np.array([[True, False]])}
    path = tmp_path / "m.golden.npz"
    publish.write_npz(str(path), arrays)
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == ["mask.npy", "output.npy", "source2.npy"]  # sorted
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)  # not the clock: same content, same bytes
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.create_system == 3
            assert info.external_attr == 0o644 << 16
            expected = io.BytesIO()
            np.lib.format.write_array(expected, arrays[info.filename[:-4]], allow_pickle=False)
            assert zf.read(info) == expected.getvalue()
    with np.load(path, allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for name, array in arrays.items():
            np.testing.assert_array_equal(loaded[name], array)
            assert loaded[name].dtype == array.dtype
    again = tmp_path / "again.npz"
    publish.write_npz(str(again), dict(reversed(list(arrays.items()))))
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("dtype", [object, [("x", np.float32), ("y", object)]], ids=["object", "field"])
def test_golden_npz_refuses_object_arrays_by_name(tmp_path, dtype):
    """Nothing a reader would have to unpickle: np.load(..., allow_pickle=False) reads it all."""
    with pytest.raises(ValueError, match=r"^refusing to write object array 'labels'$"):
        publish.write_npz(str(tmp_path / "m.golden.npz"), {"labels": np.zeros(2, dtype=dtype),
                                                           "output": np.zeros(2)})


def test_utc_now_is_utc_to_the_second():
    stamp = publish.utc_now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp), stamp
    then = dt.datetime.fromisoformat(stamp[:-1]).replace(tzinfo=dt.timezone.utc)
    assert abs((dt.datetime.now(dt.timezone.utc) - then).total_seconds()) < 60


# -- locks, clean-up, the swap of a folder ----------------------------------------------------------


def test_lock_files_are_opened_read_write_and_never_inherited(tmp_path, monkeypatch):
    """flock on NFS is a byte-range lock, whose exclusive form needs the file open for writing;
    an inherited descriptor would keep a lock alive in a child process."""
    seen = []
    real_flock = fcntl.flock

    def flock(fd, operation):
        seen.append((fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, os.get_inheritable(fd), operation))
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    out = str(tmp_path / "out")
    with publish.staging(out) as stage:
        lock = os.path.join(stage, publish.STAGE_LOCK_NAME)
        assert publish._lock_is_free(lock) is False  # held by this staging
        assert publish._lock_is_free(os.path.join(out, publish.LOCK_NAME)) is True  # the folder lock is out
    assert not os.path.exists(stage)
    assert publish._lock_is_free(lock) is True  # gone: never locked
    assert [op for *_, op in seen] == [fcntl.LOCK_EX, fcntl.LOCK_EX, fcntl.LOCK_EX | fcntl.LOCK_NB,
                                       fcntl.LOCK_EX | fcntl.LOCK_NB]
    assert all(mode == os.O_RDWR and not inheritable for mode, inheritable, _ in seen), seen
    # _lock_is_free let go of the lock it took: another descriptor gets it at once.
    held = os.path.join(out, publish.LOCK_NAME)
    fd = os.open(held, os.O_RDWR)
    try:
        real_flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def unlink_failing_for(monkeypatch, name: str) -> None:
    """os.unlink refuses files called `name` (a busy file, an NFS silly-rename file...)."""
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) == name:
            raise PermissionError(13, "Permission denied", path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)


def test_clean_stale_carries_on_past_a_folder_it_cannot_remove(tmp_path, monkeypatch, caplog):
    stuck, gone = f"{publish.TRASH_PREFIX}1-a", [f"{publish.STAGING_PREFIX}3-c", f"{publish.TRASH_PREFIX}2-b"]
    for name in (stuck, *gone):
        (tmp_path / name / "old_savedmodel").mkdir(parents=True)
        (tmp_path / name / "old_savedmodel" / "saved_model.pb").write_bytes(b"old")
    (tmp_path / stuck / "busy").write_bytes(b"")
    unlink_failing_for(monkeypatch, "busy")
    with caplog.at_level(logging.DEBUG, logger="export"):
        assert publish.clean_stale(str(tmp_path)) == gone  # only what is really gone
    assert sorted(os.listdir(tmp_path)) == [stuck] and os.listdir(tmp_path / stuck) == ["busy"]
    assert caplog.messages == [f"removed stale folders of killed exports: {gone[0]}, {gone[1]}"]
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="export"):
        assert publish.clean_stale(str(tmp_path)) == [stuck]  # tried again, next time
        assert publish.clean_stale(str(tmp_path)) == []
    assert os.listdir(tmp_path) == []
    assert caplog.messages == [f"removed stale folders of killed exports: {stuck}"]
    assert publish.clean_stale(str(tmp_path / "missing")) == []


def test_publish_swaps_a_folder_through_a_trash_folder_inside_the_output(tmp_path, monkeypatch):
    """The old folder goes aside within the output folder (one file system: renames, no copies);
    if it cannot be removed afterwards, the publish still stands and the next clean-up takes it."""
    stage, out = tmp_path / "stage", tmp_path / "out"
    (stage / "m_savedmodel").mkdir(parents=True)
    (stage / "m_savedmodel" / "saved_model.pb").write_bytes(b"new graph")
    (out / "m_savedmodel").mkdir(parents=True)
    (out / "m_savedmodel" / "busy").write_bytes(b"old graph")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst)))
    unlink_failing_for(monkeypatch, "busy")

    assert publish.publish(str(stage), str(out), ["m_savedmodel"]) == [str(out / "m_savedmodel")]

    assert os.listdir(out / "m_savedmodel") == ["saved_model.pb"]
    (trash,) = [n for n in os.listdir(out) if n != "m_savedmodel"]
    assert trash.startswith(f"{publish.TRASH_PREFIX}{os.getpid()}-")
    assert replaced[0] == (str(out / "m_savedmodel"), str(out / trash / "m_savedmodel"))
    assert os.listdir(out / trash / "m_savedmodel") == ["busy"]
    monkeypatch.undo()
    assert publish.clean_stale(str(out)) == [trash]
    assert os.listdir(out) == ["m_savedmodel"]
