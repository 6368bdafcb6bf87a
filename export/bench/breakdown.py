"""`python -m export.bench.breakdown`: where a float32 TFLite file's time goes in LiteRT/XNNPACK.

LiteRT's Python API has no per-op profile of a delegated graph (XNNPACK takes the whole file as
one DELEGATE node), so this times sub-graphs instead: files built from the same folded weights
("source" layout, no masks) that each leave one part out, interleaved in one process with the
cell's one-op graph (call overhead) and an SGEMM (the peak of the moment, export.bench.floor):

    late              the late softmax, e = exp(l - max) and (e·V) / Σe (published for rows of
                      at most export.graph.LATE_SOFTMAX_MAX_KEYS keys)
    softmax           the same with one SOFTMAX op (published for longer rows)
    no-normalization  logits straight into the values' matmul: projections and core matmuls
    no-core           the projections only (queries reshaped straight into the output matmul)
    overhead          the one-op graph with the same inputs and outputs

Differences of medians give each part's time; `parts` pairs each with its FLOPs at the peak.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import numpy as np

from export import reference
from export.bench.build import Artifact
from export.bench.floor import floor_distance, one_op_graph, sgemm_call, sgemm_gflops
from export.bench.timing import make_call, time_interleaved
from export.graph import (
    LATE_SOFTMAX_MAX_KEYS,
    build_inference_function,
    executed_flops,
    fold_weights,
    input_signature,
    preferred_layout,
)
from export.spec import ArtifactSpec
from export.tflite.build import build_tflite

log = logging.getLogger("export")

STAGES = ("late", "softmax", "no-normalization", "no-core")


def part_flops(spec, batch: int) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of the "source" layout's matmuls, by part, for `batch` rows."""
    tq, tkv, fq, fkv, u, h = (spec.query_len, spec.kv_len, spec.query_features,
                              spec.kv_features, spec.units, spec.heads)
    return {"projections": 2 * batch * (tq * fq * h * fkv + tq * h * fkv * u),
            "core matmuls": 2 * batch * 2 * h * tq * tkv * fkv}


def parts(medians: dict[str, float], flops: dict[str, int], peak_gflops: float) -> list[dict]:
    """[{part, us, floor_us}]: each part's time (differences of the stages' medians, µs) and its
    floor (FLOPs at `peak_gflops`; the call overhead's floor is itself, normalization has none).

    `medians` holds "overhead" and every name of STAGES.
    """
    missing = [k for k in ("overhead", *STAGES) if k not in medians]
    if missing or peak_gflops <= 0:
        raise ValueError(f"parts needs the medians of overhead and {STAGES} and a positive peak. "
                         f"Missing: {missing}, peak_gflops={peak_gflops!r}")
    m = medians
    at_peak = {k: v / (peak_gflops * 1e3) for k, v in flops.items()}
    return [
        {"part": "call overhead", "us": m["overhead"], "floor_us": m["overhead"]},
        {"part": "projections", "us": m["no-core"] - m["overhead"],
         "floor_us": at_peak["projections"]},
        {"part": "core matmuls", "us": m["no-normalization"] - m["no-core"],
         "floor_us": at_peak["core matmuls"]},
        {"part": "SOFTMAX op", "us": m["softmax"] - m["no-normalization"], "floor_us": 0.0},
        {"part": "late softmax", "us": m["late"] - m["no-normalization"],
         "floor_us": 0.0},
    ]


def stage_function(spec, folded, stage: str):
    """The `tf.function` of one of STAGES for `spec` (fixed batch, no masks or scores)."""
    import tensorflow as tf  # lazy: only when building (export.graph has loaded it anyway)


    if stage in ("late", "softmax"):
        # Forced at any length: the published file has it only up to LATE_SOFTMAX_MAX_KEYS.
        return build_inference_function(spec, folded, layout="source",
                                        late_softmax=stage == "late",
                                        late_softmax_max_keys=spec.kv_len)
    if stage not in STAGES:
        raise ValueError(f"`stage` must be one of {STAGES}. Received: stage={stage!r}")
    b, tq, h, fkv, fq = spec.batch, spec.query_len, folded.heads, spec.kv_features, spec.query_features
    bias = (folded.output_bias.astype(np.float64) + folded.vo_bias).astype(np.float32)

    def call(source1, source2):
        q = tf.matmul(tf.reshape(source1, [-1, fq]), folded.qk_kernel) + folded.qk_bias
        context = tf.reshape(q, [b, tq * h, fkv])
        if stage == "no-normalization":
            context = tf.matmul(tf.matmul(context, source2, transpose_b=True), source2)
        out = tf.matmul(tf.reshape(context, [-1, h * fkv]), folded.vo_kernel) + bias
        return {"output": tf.identity(tf.reshape(out, [b, tq, spec.units]), name="output")}

    return tf.function(call, input_signature=input_signature(spec), autograph=False)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m export.bench.breakdown", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--query-len", type=int, default=10)
    p.add_argument("--kv-len", type=int, default=10)
    p.add_argument("--batch", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs per batch (default 3)")
    p.add_argument("--seconds", type=float, default=2.0, help="per call and run (default 2)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    spec = ArtifactSpec(units=args.units, heads=args.heads, query_len=args.query_len,
                        kv_len=args.kv_len, name="breakdown")
    if preferred_layout(spec, "per-head") != "source":
        print("the breakdown covers the \"source\" layout; these shapes use a head layout")
        return 2
    folded = fold_weights(reference.random_weights(spec, args.seed), spec.heads)
    workdir = tempfile.mkdtemp(prefix="xattn-breakdown-")
    published = "late" if spec.kv_len <= LATE_SOFTMAX_MAX_KEYS else "softmax"
    print(f"LiteRT (XNNPACK), one thread, float32, Tq {spec.query_len} Tkv {spec.kv_len}; medians "
          f"of interleaved calls, µs; the published file: {published}")
    for batch in [int(b) for b in args.batch.split(",")]:
        at = spec.replace(batch=batch)
        calls = {}
        for stage in STAGES:
            folder = os.path.join(workdir, f"{stage}_b{batch}")
            os.makedirs(folder, exist_ok=True)
            path = build_tflite(at.replace(name=stage), stage_function(at, folded, stage), folder).path
            calls[stage] = path
        calls["overhead"] = one_op_graph("tflite", at, workdir)
        feeds = reference.make_inputs(at, batch, 4242)
        calls = {k: make_call(Artifact("breakdown", "tflite", "none", p, batch), feeds, 1)
                 for k, p in calls.items()}
        calls["sgemm"] = sgemm_call(workdir, 1)
        executed = executed_flops(spec, "source", batch=batch)
        for r in range(args.rounds):
            t = time_interleaved(calls, iterations=100_000, warmup=200, max_seconds=args.seconds)
            med = {k: float(np.median(v)) for k, v in t.items()}
            peak = sgemm_gflops(med.pop("sgemm"))
            dist = {k: floor_distance(med[k], med["overhead"], executed, peak)
                    for k in ("late", "softmax")}
            print(f"\nbatch {batch}, run {r + 1}: SGEMM {peak:.0f} GFLOP/s, floor "
                  f"{dist['late']['floor_us']:.1f} µs; late softmax {med['late']:.1f} µs = "
                  f"{dist['late']['floor_distance']:.2f}x the floor, SOFTMAX op "
                  f"{med['softmax']:.1f} µs = {dist['softmax']['floor_distance']:.2f}x "
                  f"(late/SOFTMAX {med['late'] / med['softmax']:.2f})")
            for row in parts(med, part_flops(at, batch), peak):
                floor = f"{row['floor_us']:.2f}" if row["floor_us"] else "-"
                print(f"  {row['part']:26s} {row['us']:8.2f} µs   at the peak {floor}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
