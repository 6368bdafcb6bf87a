"""Caches out of the work tree (export.caches): XATTN_CACHE_DIR, else an absolute XDG_CACHE_HOME,
else ~/.cache, each under `xattn/`; the ARM cache defaults there and says where when it is used."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO, run_module

from export import caches

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("env, expected", [
    ({"XATTN_CACHE_DIR": "/srv/c"}, "/srv/c"),
    ({"XATTN_CACHE_DIR": "/srv/c", "XDG_CACHE_HOME": "/x"}, "/srv/c"),
    ({"XDG_CACHE_HOME": "/x"}, "/x/xattn"),
    ({"XDG_CACHE_HOME": "relative/c"}, "HOME/.cache/xattn"),  # XDG: relative paths are ignored
    ({"XDG_CACHE_HOME": ""}, "HOME/.cache/xattn"),
    ({}, "HOME/.cache/xattn"),
], ids=["explicit", "explicit-wins", "xdg", "xdg-relative", "xdg-empty", "default"])
def test_cache_root(env, expected, monkeypatch, tmp_path):
    for name in ("XATTN_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert caches.cache_root() == expected.replace("HOME", str(tmp_path))
    assert caches.cache_dir("arm") == os.path.join(expected.replace("HOME", str(tmp_path)), "arm")


def test_explicit_cache_dir_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XATTN_CACHE_DIR", "here")
    assert caches.cache_root() == str(tmp_path / "here")


def test_arm_cache_defaults_outside_the_work_tree_and_help_says_where(tmp_path):
    done = run_module("export.arm", "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("default $XATTN_CACHE_DIR/arm, else ${XDG_CACHE_HOME:-~/.cache}/xattn/arm; printed "
            "when used" in " ".join(done.stdout.split()))
    moved = subprocess.run([sys.executable, "-c", "import export.arm; print(export.arm.DEFAULT_CACHE)"],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "XATTN_CACHE_DIR": str(tmp_path / "c")})
    assert moved.stdout.strip() == str(tmp_path / "c" / "arm"), moved.stderr
    from export import arm

    assert not os.path.abspath(arm.DEFAULT_CACHE).startswith(REPO + os.sep)


def test_arm_provision_prints_the_cache_it_used(tmp_path, monkeypatch, caplog):
    from export.arm import cache

    made = []
    monkeypatch.setattr(cache, "find_qemu", lambda qemu=None: "/bin/true")
    monkeypatch.setattr(cache, "runtime_versions", lambda: {"numpy": "2"})
    monkeypatch.setattr(cache, "_step", lambda where, name, key, make: made.append(name)
                        or os.path.join(where, name))
    monkeypatch.setattr(cache.os, "listdir", lambda path: [])
    with caplog.at_level(logging.INFO, logger="export"):
        emulator = cache.provision(str(tmp_path / "arm"))
    assert made == ["rootfs", "wheels", "project", "site"]
    assert emulator.rootfs == str(tmp_path / "arm" / "rootfs")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache ")]
    assert str(tmp_path / "arm") in line and "$XATTN_CACHE_DIR moves it" in line
