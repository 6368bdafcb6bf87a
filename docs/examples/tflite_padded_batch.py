"""Two sequences of different lengths, padded into one batch and run through the TFLite file.

Build the file first (batch 2, both masks):
    python -m export.tflite --batch 2 --query-mask --value-mask
tests/test_masks.py runs this file as it is.
"""

import numpy as np
from ai_edge_litert.interpreter import Interpreter

interpreter = Interpreter(model_path="artifacts/xattn_u64_h4_q10x64_kv10x64_b2_qmask_vmask.tflite")
run = interpreter.get_signature_runner("serving_default")
TQ, TKV, F = 10, 10, 64  # the file's static query length, key/value length and feature size

rng = np.random.default_rng(0)
queries = [rng.standard_normal((4, F)), rng.standard_normal((10, F))]  # lengths 4 and 10
values = [rng.standard_normal((7, F)), rng.standard_normal((3, F))]  # lengths 7 and 3


def pad(seqs, length):
    """A zero-padded (B, length, F) float32 batch and its (B, length) mask, True on real steps."""
    batch = np.zeros((len(seqs), length, F), np.float32)
    for i, seq in enumerate(seqs):
        batch[i, : len(seq)] = seq
    mask = np.arange(length) < np.array([len(seq) for seq in seqs])[:, None]
    return batch, mask


source1, query_mask = pad(queries, TQ)
source2, value_mask = pad(values, TKV)
result = run(source1=source1, source2=source2, query_mask=query_mask, value_mask=value_mask)
outputs = [result["output"][i, : len(q)] for i, q in enumerate(queries)]  # keep the valid rows
print([o.shape for o in outputs])  # [(4, 64), (10, 64)]
