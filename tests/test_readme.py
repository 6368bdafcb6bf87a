"""The README's Python examples run as written (paths pointed at freshly built artifacts)."""

from __future__ import annotations

import os
import re

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
PADDED_EXAMPLE = os.path.join(REPO, "docs", "examples", "tflite_padded_batch.py")


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_layer_example_runs():
    (block,) = [b for b in python_blocks() if "CrossAttention(units=64" in b]
    scope: dict = {}
    exec(compile(block, "README.md (layer example)", "exec"), scope)
    assert tuple(scope["out"].shape) == (32, 10, 64)
    assert tuple(scope["scores"].shape) == (32, 4, 10, 12)


def test_running_the_files_example_runs(artifact_factory):
    out_dir, _ = artifact_factory(formats=("tflite", "onnx"))
    (block,) = [b for b in python_blocks() if "InferenceSession" in b and "get_modelmeta" not in b]
    scope: dict = {}
    code = block.replace('"artifacts/', f'"{out_dir}/')
    exec(compile(code, "README.md (running the files)", "exec"), scope)
    assert scope["output"].shape == (1, 10, 64)
    assert np.isfinite(scope["output"]).all()


def test_padded_batch_example_is_the_tested_file():
    """tests/test_masks.py runs docs/examples/tflite_padded_batch.py; the README shows its code."""
    (block,) = [b for b in python_blocks() if "def pad(" in b]
    with open(PADDED_EXAMPLE, encoding="utf-8") as f:
        example = f.read()
    assert block.strip() in example
