"""Attacks on the issue-27 fixes (a hostile round after Trust III): one regression test per defect.

Library functions are tested directly; a subprocess or a socket only where the command line or
the wire is the point.
"""

from __future__ import annotations

import json
import types

import pytest

from export import pipeline
from export.errors import SpecError

# -- a set named `NAME.len_8` must not replace the golden file of `NAME --lengths 8,...` --------


def test_a_name_equal_to_a_bucket_golden_is_refused_not_published_over_it(tmp_path):
    # `--name bk --lengths 8,16` relies on bk.len_8.golden.npz through its signature len_8; a later
    # `--name bk.len_8` writes the same file name. Only the manifest's top-level golden was
    # guarded: the second export published over it and `export.verify` then failed the first.
    manifest = {"golden": "bk.len_16.golden.npz", "golden_sha256": "a" * 64,
                "signatures": [{"key": "len_8", "golden": "bk.len_8.golden.npz",
                                "golden_sha256": "b" * 64},
                               {"key": "len_16", "golden": "bk.len_16.golden.npz",
                                "golden_sha256": "a" * 64}]}
    (tmp_path / "bk.onnx.json").write_text(json.dumps(manifest))
    goldens = {"bk.len_8.golden.npz": types.SimpleNamespace(sha256="c" * 64)}
    with pytest.raises(SpecError, match=r"bk\.onnx\.json .* under the name 'bk\.len_8'"):
        pipeline._guard_shared_files(str(tmp_path), {}, goldens)
    # The same golden bytes (a rebuild with the same weights) are not a conflict.
    pipeline._guard_shared_files(str(tmp_path), {}, {
        "bk.len_8.golden.npz": types.SimpleNamespace(sha256="b" * 64)})


# -- a sequence of length 0 is the client's mistake (400), not the server's (500) ---------------


@pytest.mark.parametrize("lengths", [(0, 1), (1, 0), (0, 0)], ids=["tq0", "tkv0", "both0"])
def test_a_zero_length_sequence_is_a_400_not_an_onnxruntime_500(lengths):
    # A dynamic-length file (`--lengths 8,16` ONNX) took shape [1, 0, 64]: onnxruntime failed in
    # its Add/Reshape and the server answered 500 with the runtime's message.
    from export.serve.protocol import RequestError, TensorSpec, decode_infer_request

    tq, tkv = lengths
    inputs = [TensorSpec("source1", "FP32", (-1, -1, 4)), TensorSpec("source2", "FP32", (-1, -1, 4))]
    body = json.dumps({"inputs": [
        {"name": "source1", "shape": [1, tq, 4], "datatype": "FP32", "data": [0.5] * 4 * tq},
        {"name": "source2", "shape": [1, tkv, 4], "datatype": "FP32", "data": [0.5] * 4 * tkv},
    ]}).encode()
    with pytest.raises(RequestError, match=r"input `source[12]` has an axis of size 0") as e:
        decode_infer_request(body, None, inputs, [TensorSpec("output", "FP32", (-1, -1, 4))])
    assert e.value.status == 400
