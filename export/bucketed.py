"""Run unpadded sequences through a file with several lengths: pick a bucket, pad, mask, unpad.

numpy plus the runtime only (never TensorFlow for TFLite and ONNX files), like export.runtime.runtimes:

    from export.bucketed import BucketedRunner

    runner = BucketedRunner("model.tflite", threads=1)
    outputs = runner.run([query_a, query_b], [memory_a, memory_b])  # (Tq_i, Fq), (Tkv_i, Fkv)
    outputs[0]["output"]  # (Tq_a, units): query_a's rows only

Each request goes to the smallest bucket (signature `len_16`, `len_16x32`) that holds both of
its lengths, padded with zeros, with `query_mask`/`value_mask` marking its real positions; a
dynamic-length ONNX file needs no bucket and runs every request at its own lengths.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import numpy as np

from export.buckets import pick_bucket
from export.errors import InputError
from export.formats import REGISTRY, format_of_file, get_format
from export.runtime import runtimes
from export.spec import bucket_key

_KEY = re.compile(r"^len_(\d+)(?:x(\d+))?$")


def _format_of(path: str) -> str:
    fmt = format_of_file(path)
    if fmt is not None:
        return fmt.name
    raise InputError(f"cannot tell the format of {path}; pass fmt= (one of {', '.join(REGISTRY)})")


def file_buckets(path: str, fmt: str) -> tuple[tuple[int, int], ...]:
    """The (Tq, Tkv) buckets of a file: its manifest's, else its `len_*` signature keys (TFLite)."""
    manifest = path.rstrip(os.sep) + ".json"
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            lengths = json.load(f).get("shapes", {}).get("lengths")
        if lengths:
            return tuple((int(q), int(kv)) for q, kv in lengths)
    keys = get_format(fmt).signature_keys(path)
    if keys:
        found = [_KEY.match(k) for k in keys]
        return tuple(sorted(((int(m[1]), int(m[2] or m[1])) for m in found if m),
                            key=lambda p: (p[0] * p[1], p)))
    return ()


class BucketedRunner:
    """A file with several lengths (`--lengths`), fed unpadded sequences.

    Args:
        path: the artifact (a `.tflite`, `.onnx` or SavedModel folder), its manifest beside it
            or not.
        fmt: its format; by default told from the file name.
        threads: the runtime's threads.
        batch: the file's fixed batch (1 for TFLite by default); None where it is dynamic.
    """

    def __init__(self, path: str, fmt: str | None = None, *, threads: int | None = None,
                 batch: int | None = ...):
        self.path = path
        self.format = fmt or _format_of(path)
        record = get_format(self.format)
        if not record.several_lengths:
            raise InputError(f"{path} is a {record.title} file: one static length, no buckets; "
                             "BucketedRunner takes a file built with --lengths")
        self.batch = record.default_batch if batch is ... else batch
        self.threads = threads
        self.buckets = file_buckets(path, self.format) if record.signatures else ()
        if record.signatures and not self.buckets:
            raise InputError(f"{path} has no length buckets (signatures len_16, ...); "
                             "build it with --lengths")
        self._runners: dict[str | None, runtimes.Runner] = {}

    def _runner(self, signature: str | None) -> runtimes.Runner:
        if signature not in self._runners:
            self._runners[signature] = runtimes.load_runner(
                self.format, self.path, batch=self.batch, threads=self.threads,
                signature=signature)
        return self._runners[signature]

    def bucket_for(self, query_len: int, kv_len: int) -> tuple[int, int]:
        """The smallest bucket that holds a request; InputError when none does."""
        if not self.buckets:
            return query_len, kv_len  # a dynamic-length file: no padding
        found = pick_bucket(self.buckets, query_len, kv_len)
        if found is None:
            largest = ", ".join(bucket_key(q, kv) for q, kv in self.buckets)
            raise InputError(f"a request of query length {query_len} and key/value length "
                             f"{kv_len} fits no bucket of {self.path} ({largest})")
        return found

    def run(self, queries: Sequence[np.ndarray],
            memories: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Outputs of each (query (Tq_i, Fq), memory (Tkv_i, Fkv)) pair, unpadded: `output`
        (Tq_i, units), and `attention_scores` (heads, Tq_i, Tkv_i) where the file has it."""
        if len(queries) != len(memories):
            raise InputError(f"as many queries as memories are needed. Received: "
                             f"{len(queries)} and {len(memories)}")
        queries = [np.asarray(q, dtype=np.float32) for q in queries]
        memories = [np.asarray(m, dtype=np.float32) for m in memories]
        for i, (q, m) in enumerate(zip(queries, memories)):
            if q.ndim != 2 or m.ndim != 2 or not q.shape[0] or not m.shape[0]:
                raise InputError(f"request {i}: query and memory must be (length >= 1, "
                                 f"features). Received: {q.shape} and {m.shape}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (q, m) in enumerate(zip(queries, memories)):
            groups.setdefault(self.bucket_for(len(q), len(m)), []).append(i)
        results: list[dict | None] = [None] * len(queries)
        for (tq, tkv), members in groups.items():
            step = self.batch or len(members)
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                outputs = self._run_padded([queries[i] for i in chunk],
                                           [memories[i] for i in chunk], tq, tkv, step)
                for row, i in enumerate(chunk):
                    lq, lkv = len(queries[i]), len(memories[i])
                    results[i] = {
                        name: (value[row, :, :lq, :lkv] if name == "attention_scores"
                               else value[row, :lq])
                        for name, value in outputs.items()
                    }
        return results

    def _run_padded(self, queries, memories, tq: int, tkv: int, rows: int) -> dict:
        # A fixed batch larger than the chunk is filled with one-position dummy rows.
        fq, fkv = queries[0].shape[1], memories[0].shape[1]
        feeds = {
            "source1": np.zeros((rows, tq, fq), np.float32),
            "source2": np.zeros((rows, tkv, fkv), np.float32),
            "query_mask": np.zeros((rows, tq), bool),
            "value_mask": np.zeros((rows, tkv), bool),
        }
        feeds["query_mask"][:, 0] = feeds["value_mask"][:, 0] = True
        for row, (q, m) in enumerate(zip(queries, memories)):
            feeds["source1"][row, :len(q)] = q
            feeds["source2"][row, :len(m)] = m
            feeds["query_mask"][row] = np.arange(tq) < len(q)
            feeds["value_mask"][row] = np.arange(tkv) < len(m)
        runner = self._runner(bucket_key(tq, tkv) if self.buckets else None)
        # A dynamic-length file without masks: every request runs at its own lengths, unpadded.
        takes = {i.name for i in runner.inputs or ()} or set(feeds)
        return runner.run({k: v for k, v in feeds.items() if k in takes})
