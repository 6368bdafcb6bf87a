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
from export.errors import OutOfMemoryError, SpecError
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


def test_a_model_export_over_one_with_other_golden_inputs_names_sample_inputs(tmp_path):
    # README "Whole models": `--model forecaster.keras` then the same model `--quantize int8
    # --sample-inputs samples.npz` into the same folder was refused as "other weights", though
    # the weights were the same: the golden inputs differed (seeded rows vs --sample-inputs).
    from types import SimpleNamespace

    from export.model import ModelSpec
    from export.pipeline import _guard_shared_files
    from export.spec import TensorInfo

    (tmp_path / "forecaster.onnx.json").write_text(
        '{"golden": "forecaster.golden.npz", "golden_sha256": "' + "a" * 64 + '"}')
    spec = ModelSpec(model_inputs=(TensorInfo("past", (12, 3), "float32"),),
                     model_outputs=(TensorInfo("output", (4,), "float32"),), stem="forecaster",
                     quantize="int8")
    goldens = {"forecaster.golden.npz": SimpleNamespace(sha256="b" * 64)}
    with pytest.raises(SpecError, match=r"other weights under the name 'forecaster' or other "
                                        r"--sample-inputs, .* pass --name to keep both"):
        _guard_shared_files(str(tmp_path), {"tflite": spec}, goldens)
    layer = ArtifactSpec(name="forecaster")
    with pytest.raises(SpecError, match=r"under the name 'forecaster', and this export") as refused:
        _guard_shared_files(str(tmp_path), {"tflite": layer}, goldens)
    assert "--sample-inputs" not in str(refused.value)
