"""`python -m export.bench` flags: shapes as `python -m export`, what to measure, timing."""

from __future__ import annotations

import argparse
import logging

from export.flags import (
    SHAPE_DEFAULTS,
    OneLineParser,
    add_model_flags,
    complete,
    lengths_arg,
    path_arg,
    positive_float,
    positive_int,
    positive_int_list,
)
from export.formats import get_format
from export.spec import QUANTIZE_MODES

log = logging.getLogger("export")


RUNTIMES = ("onnx", "tflite")
VARIANT_LABEL = {"none": "float32", "float16": "float16", "dynamic-int8": "dyn-int8", "int8": "int8",
                 "int8-cpu": "int8-cpu"}
PEAK_SIZES = (256, 512, 1024)
PARITY_SEED = 4242


def variant_label(variant: str, fmt: str) -> str:
    """How tables name `variant` in `fmt`: `int8-cpu=int8` where the format builds its int8 file
    for it (ONNX, ORT: Format.same_variant)."""
    built = get_format(fmt).variant_for(variant)
    return VARIANT_LABEL[variant] if built == variant else f"{VARIANT_LABEL[variant]}={VARIANT_LABEL[built]}"


def _choice_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"must be a comma-separated list of {', '.join(choices)}, got {text!r}")
        return list(dict.fromkeys(values))

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m export.bench",
        description=(
            "Time our ONNX and TFLite artifacts against Keras's own model.export() of the same "
            "weights (interleaved, one process), against this machine's single-thread SGEMM "
            "peak measured in the same run; print a table and optionally write --json."
        ),
    )
    shapes = parser.add_argument_group("layer and shapes (as python -m export)")
    for key, default in SHAPE_DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        shapes.add_argument(flag, type=positive_int, default=default,
                            help=f"{key.replace('_', ' ')} (default {default})")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    sweep = parser.add_argument_group("what to measure")
    sweep.add_argument("--batch", type=positive_int_list, default=[1, 32], metavar="N[,N...]",
                       help="batch sizes (default 1,32)")
    sweep.add_argument("--lengths", type=positive_int_list, metavar="L[,L...]",
                       help="sweep sequence length: each L sets --query-len and --kv-len "
                            "(default: the --query-len/--kv-len given)")
    sweep.add_argument("--buckets", type=lengths_arg, metavar="L,L,...|QxKV,...",
                       help="instead of the Keras comparison: a request of the smallest length "
                            "through the largest-length file with masks vs the bucketed file "
                            "(--lengths L,L,...) and, in onnxruntime, the dynamic-length file vs "
                            "a static file of the request's length; batch 1")
    sweep.add_argument("--threads", type=positive_int, default=1,
                       help="runtime threads (default 1)")
    sweep.add_argument("--runtimes", type=_choice_list(RUNTIMES), default=list(RUNTIMES),
                       metavar="onnx,tflite", help="runtimes to time (default both)")
    sweep.add_argument("--variants", type=_choice_list(QUANTIZE_MODES), default=["none"],
                       metavar="V[,V...]",
                       help=f"our variants: {', '.join(QUANTIZE_MODES)} (default none = float32); "
                            "each is compared with Keras's float32 export")
    sweep.add_argument("--onnx-batch", choices=("dynamic", "fixed"), default="dynamic",
                       help="our ONNX file: one dynamic-batch file (default) or one per batch")
    sweep.add_argument("--keras-onnx-batch", choices=("dynamic", "fixed"), default="fixed",
                       help="Keras's ONNX export: one per batch (default) or one dynamic file")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--iterations", type=positive_int, default=2000,
                        help="timed calls per artifact and cell, at most (default 2000)")
    timing.add_argument("--warmup", type=positive_int, default=200,
                        help="untimed calls first (default 200)")
    timing.add_argument("--max-seconds", type=positive_float, default=3.0,
                        help="time budget per artifact and cell; fewer calls for slow cells "
                             "(default 3)")
    timing.add_argument("--startup", action="store_true",
                        help="also time `python -m export.onnx --units U --heads H` end to end "
                             "against a bare Keras model.export(format='onnx') script")
    timing.add_argument("--startup-runs", type=positive_int, default=5,
                        help="runs of each with --startup, interleaved (default 5)")
    whole = parser.add_argument_group(
        "a whole model (as python -m export --model): ours against Keras's model.export of it; "
        "the layer's shape and sweep flags do not apply")
    add_model_flags(whole, saved_model=False)
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=path_arg, metavar="PATH", help="write every figure to PATH as JSON")
    out.add_argument("--keep-dir", type=path_arg, metavar="DIR",
                     help="build into DIR and keep the artifacts (default: a temporary folder)")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    talk.add_argument("-q", "--quiet", action="store_true", help="print the table only")
    return complete(parser)
