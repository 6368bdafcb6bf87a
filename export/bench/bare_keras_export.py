"""The baseline of the start-up timing: what a user's plain Keras export script does.

Run as a script (`python bare_keras_export.py OUT U H Q FQ KV FKV`), never imported by the
benchmark: it imports TensorFlow, builds the layer, and calls `model.export(format="onnx")`.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402, F401

from xattn import CrossAttention  # noqa: E402


def main(out: str, units: int, heads: int, q: int, fq: int, kv: int, fkv: int) -> None:
    s1 = keras.Input((q, fq), name="source1")
    s2 = keras.Input((kv, fkv), name="source2")
    model = keras.Model({"source1": s1, "source2": s2}, CrossAttention(units, heads)([s1, s2]))
    model({"source1": np.zeros((1, q, fq), "float32"), "source2": np.zeros((1, kv, fkv), "float32")})
    model.export(os.path.join(out, "model.onnx"), format="onnx", verbose=False)


USAGE = "usage: python -m export.bench.bare_keras_export OUT UNITS HEADS Q FQ KV FKV"

if __name__ == "__main__":
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(USAGE + "\n\nThe start-up baseline of python -m export.bench --startup: a plain Keras "
              "export of the layer into OUT/model.onnx.")
        sys.exit(0)
    if len(sys.argv) != 8 or not all(a.isdigit() and int(a) > 0 for a in sys.argv[2:]):
        print(f"{USAGE} (positive integers). Received: {' '.join(sys.argv[1:]) or 'nothing'}",
              file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1], *(int(a) for a in sys.argv[2:8]))
