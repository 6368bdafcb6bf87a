"""Crashes found by running command lines as a user does (issue 22), one regression test each.

The README commands test (test_commands.py) and the CLI fuzz (test_cli_fuzz.py) find them; each
is pinned here by the exact command line that crashed.
"""

from __future__ import annotations

import os

import pytest
from conftest import run_module

from export import resources, verify
from export.buckets import DYNAMIC_CHECK_LENGTHS
from export.errors import OutOfMemoryError
from export.spec import ArtifactSpec


def test_the_readme_dynamic_length_command_publishes_a_verified_file(tmp_path):
    # README "Dynamic lengths": the memory guard multiplied the symbolic lengths (None) and the
    # command ended in a TypeError traceback. The exact command, --output-dir appended.
    done = run_module("export.onnx", "--query-len", "dynamic", "--kv-len", "dynamic",
                      "--output-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    published = [f for f in os.listdir(tmp_path) if f.endswith(".onnx")]
    assert published == ["xattn_u64_h4_qdynx64_kvdynx64.onnx"]
    results = verify.verify_path(str(tmp_path))
    assert [r.status for r in results] == ["passed"], [r.reason for r in results]


def test_memory_estimate_of_a_symbolic_length_is_the_largest_verified_one():
    largest = max(DYNAMIC_CHECK_LENGTHS)
    dynamic = {"onnx": ArtifactSpec(query_len=None, kv_len=None, batch=None)}
    at_largest = {"onnx": ArtifactSpec(query_len=largest, kv_len=largest, batch=None)}
    assert resources.estimate_bytes(dynamic) == resources.estimate_bytes(at_largest)
    one_axis = {"onnx": ArtifactSpec(query_len=5, kv_len=None, batch=None)}
    assert resources.estimate_bytes(one_axis) == resources.estimate_bytes(
        {"onnx": ArtifactSpec(query_len=5, kv_len=largest, batch=None)})
    # The refusal says the symbolic lengths were estimated at the largest verified length.
    wide = {"onnx": ArtifactSpec(units=4096, heads=64, query_len=None, kv_len=None, batch=None)}
    with pytest.raises(OutOfMemoryError, match=rf"dynamic lengths estimated at {largest}, the "
                                               r"largest verified\); 1.0 GiB is available"):
        resources.check_memory(wide, available=1 << 30)
