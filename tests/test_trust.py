"""Trust, second round (issue 15): one test per hole a hostile tester found, and signed sets.

Artifacts come from the session `artifact_factory` (copied before a test changes them); a
subprocess runs only where a command line, a second process or a second mount namespace is the
point. Shapes are small.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from export import verify
from export.verify import cli as verify_cli

SMALL = dict(units=8, heads=2, query_len=4, kv_len=5, query_features=6, kv_features=7)
SMALL_FLAGS = ["--units", "8", "--heads", "2", "--query-len", "4", "--kv-len", "5",
               "--query-features", "6", "--kv-features", "7"]
NAME = "xattn_u8_h2_q4x6_kv5x7"


@pytest.fixture()
def published(artifact_factory, tmp_path):
    """A private copy of a published SMALL set (SavedModel, TFLite, ONNX; seed 0)."""
    out, _ = artifact_factory(**SMALL)
    folder = str(tmp_path / "out")
    shutil.copytree(out, folder, symlinks=True)
    return folder


def edit_manifest(path: str, **fields) -> None:
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest.update(fields)
    for key in [k for k, v in fields.items() if v is None]:
        del manifest[key]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def statuses(folder: str) -> dict[str, str]:
    return {os.path.basename(r.manifest): r.status + ": " + r.reason for r in verify.verify_path(folder)}

# -- 5. the layer refuses batches known to differ -------------------------------------------------


@pytest.mark.parametrize("batches", [(2, 1), (1, 2), (3, 2)], ids=["2vs1", "1vs2", "3vs2"])
def test_layer_refuses_different_batch_sizes(batches):
    import keras

    from xattn import CrossAttention

    a = np.zeros((batches[0], 4, 6), np.float32)
    b = np.zeros((batches[1], 5, 7), np.float32)
    shapes = rf"source1.shape=\({batches[0]}, 4, 6\), source2.shape=\({batches[1]}, 5, 7\)"
    with pytest.raises(ValueError, match=r"same batch size.*" + shapes):
        CrossAttention(8, 2)([a, b])
    # Symbolic inputs with known batches too; an unknown batch is left to run time.
    with pytest.raises(ValueError, match="same batch size"):
        CrossAttention(8, 2)([keras.KerasTensor(a.shape), keras.KerasTensor(b.shape)])
    out = CrossAttention(8, 2)([keras.KerasTensor((None, 4, 6)), keras.KerasTensor((2, 5, 7))])
    assert tuple(out.shape) == (None, 4, 8)


def test_mask_shape_error_gives_the_batch():
    from xattn import CrossAttention

    s1, s2 = np.zeros((2, 6, 5), np.float32), np.zeros((2, 9, 7), np.float32)
    with pytest.raises(ValueError, match=r"\(B=2, 9\)"):
        CrossAttention(8, 2)([s1, s2], value_mask=np.ones((2, 6), bool))


# -- 6. verify escapes what a file says -----------------------------------------------------------


def test_verify_escapes_strings_from_the_manifest(published, capsys):
    forged = "x.onnx\n\u2713 forged.onnx  max abs diff 1.0e-07  (atol 1e-04)\x1b[32m\u202e"
    manifest = os.path.join(published, f"{NAME}.onnx.json")
    edit_manifest(manifest, artifact=forged)
    assert verify_cli.main([manifest]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 2, out  # one line for the artifact, one summary
    assert "\x1b" not in out and "\u202e" not in out
    assert "x.onnx\\x0a\u2713 forged.onnx" in out and "\\x1b[32m\\u202e" in out
