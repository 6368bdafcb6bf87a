"""The flags every entry point shares: argparse types that reject bad values in one line, the
checks of flags that do not fit together, and the one parser of `python -m export` and its
per-format entry points (`build_parser`). No TensorFlow here: `--help` and export.runtime.verify's
parser import this module.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os

from export import reporting
from export.buckets import parse_lengths
from export.errors import SpecError, exit_codes_epilog
from export.formats import FORMAT_NAMES, get_format
from export.names import NAME_RULE, is_valid_name
from export.spec import QUANTIZE_MODES

SHAPE_DEFAULTS = {
    "units": 64, "heads": 4, "query_len": 10, "kv_len": 10, "query_features": 64, "kv_features": 64,
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit 2 (argparse prints the whole usage)."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("prog") is not None:
            kwargs["prog"] = reporting.display_prog(kwargs["prog"])
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class LazyHelp(str):
    """A help text computed when `--help` prints it, not when the parser is built: the ONNX
    opset's default comes from tf2onnx, which imports TensorFlow (seconds), and a parser that
    refuses a command line must answer before that (export.formats, Format.refusal)."""

    def __new__(cls, make):
        text = super().__new__(cls, "(computed when --help prints it)")
        text._make = make
        return text

    def __mod__(self, params):  # argparse's HelpFormatter._expand_help: `help % params`
        return self._make() % params


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_int_list(text: str) -> list[int]:
    """`1,8,32` -> [1, 8, 32]: positive integers, each once (for the benchmarks' sweeps)."""
    try:
        values = [positive_int(part.strip()) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of positive integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must list at least one positive integer, got {text!r}")
    return list(dict.fromkeys(values))


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def _batch(text: str):
    if text.strip().lower() == "dynamic":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or 'dynamic', got {text!r}"
        ) from None


def _length(text: str):
    """A length flag: a positive integer, or 'dynamic' (a symbolic axis; kept as the string
    until resolve_request, since None means "not given")."""
    if text.strip().lower() == "dynamic":
        return "dynamic"
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or 'dynamic', got {text!r}") from None


def lengths_arg(text: str) -> tuple:
    try:
        return parse_lengths(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_length_flags(args: argparse.Namespace, formats: tuple[str, ...]) -> str | None:
    """The usage error of a command line whose length flags do not fit together, or None."""
    lengths = args.lengths
    if lengths and (args.query_len is not None or args.kv_len is not None):
        given = "--query-len" if args.query_len is not None else "--kv-len"
        return (f"--lengths replaces --query-len and --kv-len; give one or the other. "
                f"Received: --lengths and {given}")
    if lengths and (args.model is not None or args.saved_model is not None):
        return ("--lengths is for the lone layer: the length axes of a --model's inputs cannot "
                "be told apart from its other axes yet; export one file per length with "
                "--input-shape")
    if lengths and args.calibration:
        return ("--lengths and --calibration cannot be combined: each signature is calibrated "
                "on seeded inputs of its own lengths")
    if lengths and args.int8_io:
        return "--lengths and --int8-io cannot be combined: each signature would have its own scales"
    return check_format_flags(args, formats)


def check_format_flags(args: argparse.Namespace, formats: tuple[str, ...]) -> str | None:
    """The usage error of a command line asking a format for what its registry record says it
    cannot take (`Format.refusal`), or None: refused here, before any model is built.

    A static batch is refused only when its format is the one asked for: among several formats
    it keeps its own (a note, export.request)."""
    dynamic = [f for f, v in (("--query-len", args.query_len), ("--kv-len", args.kv_len))
               if v == "dynamic"]
    lone = len(formats) == 1
    for fmt in formats:
        reason = get_format(fmt).refusal(
            lengths=bool(args.lengths),
            dynamic_batch=lone and args.batch is None,
            dynamic_length=dynamic[0] if dynamic else None,
            quantize=args.quantize if lone else None)
        if reason:
            return reason
    return None


def path_arg(text: str) -> str:
    """A file or folder flag: a name, not an empty string (`--weights "$UNSET"` would otherwise
    mean no weights at all, `--public-key ""` no signature check)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a file or folder, got {text!r}")
    return text


def artifact_name(text: str) -> str:
    """`--name`: the one name rule (export.names), for every entry point and every path (the
    layer, --model, --lengths, tflm): a name that could leave --output-dir, or break a file name
    or generated C++, stops here with exit 2, before anything is written."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    if not is_valid_name(text):
        raise argparse.ArgumentTypeError(f"must be {NAME_RULE}, got {text!r}")
    return text


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(positive_int(d.strip()) for d in dims.split(","))
    except argparse.ArgumentTypeError:
        shape = ()
    if not sep or not name.strip() or not shape:
        raise argparse.ArgumentTypeError(
            f"must be NAME=D1,D2,... with positive integers, got {text!r}")
    return name.strip(), shape


# Flags that describe the lone layer: meaningless with --model.
LAYER_FLAGS = ("units", "heads", "query_len", "kv_len", "query_features", "kv_features",
               "weights", "query_mask", "value_mask", "causal", "scores")
MODEL_FLAGS = ("imports", "input_shapes", "sample_inputs")


def _flag(dest: str) -> str:
    return "--" + {"imports": "import", "input_shapes": "input-shape"}.get(dest, dest.replace("_", "-"))


def _reference_flag(args: argparse.Namespace) -> str | None:
    """`--model` or `--saved-model`, whichever names the reference; None for the lone layer."""
    if args.saved_model is not None:
        return "--saved-model"
    return "--model" if args.model is not None else None


def check_model_flags(args: argparse.Namespace, formats: tuple[str, ...] = ()) -> str | None:
    """The usage error of a command line mixing --model/--saved-model with the layer's flags (or
    --saved-model with a format that cannot take it), or None."""
    saved_model = args.saved_model
    refused = [f for f in formats if not get_format(f).saved_model]
    if saved_model is not None and refused:
        return (f"--saved-model cannot build {get_format(refused[0]).title} files: its graph is "
                "the user's (loops, state), which a microcontroller interpreter's int8 file "
                "cannot take; export tflite, onnx, ort or savedmodel")
    if args.model is not None and saved_model is not None:
        return (f"--model and --saved-model cannot be combined: each is the reference. Received: "
                f"--model {args.model} --saved-model {saved_model}")
    if args.signature is not None and saved_model is None:
        return "--signature applies to --saved-model only. Received: --signature without --saved-model"
    reference = _reference_flag(args)
    if reference is None:
        given = [d for d in MODEL_FLAGS if getattr(args, d)]
        if given:
            return f"{_flag(given[0])} applies to --model only. Received: {_flag(given[0])} without --model"
        return None
    path = args.model if saved_model is None else saved_model
    layer = [d for d in LAYER_FLAGS if getattr(args, d) not in (None, False)]
    if layer:
        return (f"{reference} and {_flag(layer[0])} cannot be combined: the model's inputs give the "
                f"shapes and it holds its weights. Received: {reference} {path} {_flag(layer[0])}")
    if saved_model is not None and args.imports:
        return ("--saved-model and --import cannot be combined: a SavedModel needs no Python "
                f"classes. Received: --saved-model {saved_model} --import {args.imports[0]}")
    if args.calibration:
        return (f"{reference} and --calibration cannot be combined: pass calibration rows with "
                "--sample-inputs (one array per model input)")
    return None


def add_model_flags(group, *, saved_model: bool = True) -> None:
    """`--model` and the flags that go with it (shared with `python -m export.bench`, which
    compares with Keras' own export and so takes no `--saved-model`)."""
    group.add_argument("--model", type=path_arg, metavar="PATH.keras",
                       help="a functional, Sequential or subclassed (with --import) model saved "
                            "with model.save() (.keras, or a legacy .h5; Keras 3 or Keras 2, "
                            "fusionlab-learn's CrossAttention included); loaded with safe_mode "
                            "on; its inputs and outputs name the artifact's")
    if saved_model:
        _add_saved_model_flags(group)
    group.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import MODULE first (it registers your custom layers); repeatable")
    group.add_argument("--input-shape", dest="input_shapes", action="append", default=[],
                       type=_input_shape, metavar="NAME=D1,D2,...",
                       help="fix the unknown non-batch axes of input NAME; repeatable")
    group.add_argument("--sample-inputs", type=path_arg, metavar="PATH.npz",
                       help="real inputs, one array per model input (N, ...): the golden vectors, "
                            "the verification rows and the int8 calibration data; needed for "
                            "integer inputs")


def _add_saved_model_flags(group) -> None:
    group.add_argument("--saved-model", type=path_arg, metavar="DIR",
                       help="a TensorFlow SavedModel folder (TF 2.15 ones included): its signature "
                            "is the reference; its inputs and outputs name the artifact's")
    group.add_argument("--signature", metavar="NAME",
                       help="the --saved-model signature to export (default serving_default)")


# What an option means on a parser that does not offer it (savedmodel has no --quantize, tflm no
# --opset, the benchmark no --saved-model): `complete` gives every export parser's namespace every
# option, so the code reads `args.quantize`, never `getattr(args, "quantize", "none")`.
ABSENT = {
    "lengths": None, "saved_model": None, "signature": None, "opset": None, "arena_limit": None,
    "quantize": "none", "int8_io": False, "calibration": None, "max_rel_error": None,
    "sign_key": None, "arm": False, "weights": None, "query_mask": False, "value_mask": False,
    "causal": False, "scores": False,
}


class _FormatBatch:
    """`--batch` not given: each format keeps its own default batch (`Format.default_batch`).
    Not a string: argparse would run a string default through the flag's type."""

    def __repr__(self) -> str:
        return "FORMAT_BATCH"


FORMAT_BATCH = _FormatBatch()


def complete(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`parser`, its namespaces holding every option of ABSENT that it does not offer."""
    offered = {action.dest for action in parser._actions}
    parser.set_defaults(**{k: v for k, v in ABSENT.items() if k not in offered})
    return parser


def build_parser(formats: tuple[str, ...] = FORMAT_NAMES, prog: str = "python -m export"):
    """The shared parser; format-specific flags appear only where they apply."""
    names = ", ".join(formats)
    parser = OneLineParser(
        prog=prog,
        description=(
            f"Build {names} artifact(s) of an xattn CrossAttention (or of a whole model holding "
            "it: --model), verify each in its own runtime against the Keras reference, and "
            "publish it with a manifest and golden vectors into --output-dir."
        ),
        epilog=exit_codes_epilog(),  # every code, from the error classes
    )
    shapes = parser.add_argument_group("layer and shapes")
    shapes.add_argument("--units", type=positive_int, help="layer units (default 64)")
    shapes.add_argument("--heads", type=positive_int, help="attention heads (default 4)")
    dynamic_length = [f for f in formats if get_format(f).dynamic_length]
    maybe_dynamic = (f" or 'dynamic' ({', '.join(dynamic_length)}: a symbolic axis)"
                     if dynamic_length else "")
    shapes.add_argument("--query-len", type=_length, metavar="N|dynamic" if dynamic_length else "N",
                        help=f"query length Tq (default 10){maybe_dynamic}")
    shapes.add_argument("--kv-len", type=_length, metavar="N|dynamic" if dynamic_length else "N",
                        help=f"key/value length Tkv (default 10){maybe_dynamic}")
    shapes.add_argument("--lengths", type=lengths_arg, metavar="L,L,...|QxKV,...",
                        help="several lengths in one artifact, e.g. 16,64,256 (Tq = Tkv) or "
                             "16x32,64x128: one signature per length (len_16 ...) plus "
                             "serving_default = the largest in TFLite and SavedModel, symbolic "
                             "lengths in ONNX; implies --query-mask --value-mask (pad requests "
                             "to their bucket); replaces --query-len/--kv-len")
    shapes.add_argument("--query-features", type=positive_int,
                        help="source1 feature size (default 64)")
    shapes.add_argument("--kv-features", type=positive_int,
                        help="source2 feature size (default 64)")
    defaults = ", ".join(
        f"{f} {'dynamic' if get_format(f).default_batch is None else get_format(f).default_batch}"
        for f in formats
    )
    shapes.add_argument("--batch", type=_batch, default=FORMAT_BATCH, metavar="N|dynamic",
                        help=f"batch size; only this axis can be dynamic (default: {defaults})")
    masks = parser.add_argument_group("masks and outputs")
    masks.add_argument("--query-mask", action="store_true",
                       help="add a bool input query_mask (B, Tq); True marks a real position")
    masks.add_argument("--value-mask", action="store_true",
                       help="add a bool input value_mask (B, Tkv); True marks a real position")
    masks.add_argument("--causal", action="store_true", help="bake in use_causal_mask=True")
    masks.add_argument("--scores", action="store_true",
                       help="add an output attention_scores (B, heads, Tq, Tkv)")
    whole = parser.add_argument_group(
        "a whole model (instead of the lone layer)",
        "Export a trained Keras model that uses CrossAttention: every CrossAttention inside runs "
        "the folded computation, everything else as Keras runs it, with static shapes.")
    add_model_flags(whole)
    weights = parser.add_argument_group("weights")
    weights.add_argument("--weights", type=path_arg, metavar="PATH",
                         help="a .keras file holding a CrossAttention, or a .weights.h5 from "
                              "model.save_weights of a model built like the reference")
    weights.add_argument("--seed", type=_non_negative_int, default=0,
                         help="seed of the random weights when --weights is not given (default 0)")
    out = parser.add_argument_group("output and verification")
    out.add_argument("--output-dir", type=path_arg, default="artifacts", metavar="DIR",
                     help="where artifacts are published (default artifacts/)")
    out.add_argument("--name", type=artifact_name, metavar="NAME",
                     help="base file name: 1-128 letters, digits, _ - . starting with a letter or "
                          "digit (default derived from the configuration, e.g. "
                          "xattn_u64_h4_q10x64_kv10x64)")
    out.add_argument("--sign-key", type=path_arg, metavar="KEY.pem",
                     help="sign each published set (artifact, manifest, golden, reference) with "
                          "this elliptic-curve private key into <artifact>.sig (model-signing)")
    if any("opset" in get_format(f).build_options for f in formats):
        out.add_argument("--opset", type=positive_int,
                         help=LazyHelp(lambda: f"ONNX opset (default {_default_opset_text()})"))
    if any("arena_limit" in get_format(f).build_options for f in formats):
        out.add_argument("--arena-limit", type=positive_int, metavar="BYTES",
                         help="TFLM: fail (exit 1, nothing published) when the smallest tensor "
                              "arena that runs the file is larger than BYTES")
    atol_defaults = ", ".join(f"{f} {get_format(f).atol:g}" for f in formats)
    out.add_argument("--arm", action="store_true",
                     help="also run the files under aarch64 emulation (qemu; make verify-arm "
                          "installs it) and record in each manifest's deployment.arm where they "
                          "stay within their gate")
    out.add_argument("--atol", type=positive_float,
                     help=f"max abs diff allowed vs the reference, float32 artifacts (default "
                          f"{atol_defaults}); variants gate on --max-rel-error")
    quantizable = [f for f in formats if get_format(f).quantizable]
    if quantizable:
        quant = parser.add_argument_group(f"quantized variants ({', '.join(quantizable)})")
        # A lone format with fixed variants (tflm: int8) offers only those, the first by default.
        only = get_format(formats[0]).variants if len(formats) == 1 else None
        quant.add_argument("--quantize", choices=only or QUANTIZE_MODES, default=(only or ("none",))[0],
                           type=_integer_only(get_format(formats[0]).title) if only else str,
                           help=f"variant to build (default {only[0] if only else 'none = float32'})"
                                + "".join(f"; {f} stays float32" for f in formats
                                          if not get_format(f).quantizable)
                                + ("" if only else f". {VARIANT_PER_DEVICE}"))
        quant.add_argument("--int8-io", action="store_true",
                           help="with --quantize int8 (TFLite): int8 inputs and outputs")
        quant.add_argument("--calibration", type=path_arg, metavar="PATH.npz",
                           help="calibration inputs of TFLite --quantize int8 and int8-cpu: arrays source1, "
                                "source2 (ONNX/ORT int8 is weight-only and uses none)")
        quant.add_argument("--max-rel-error", type=positive_float,
                           help="relative L2 gate of a variant (default float16 1e-3, "
                                "dynamic-int8 2.5e-2, int8 and int8-cpu 5e-2)")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    talk.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return complete(parser)


# Which variant for which device (docs/variants.md has the table and the command behind the figures).
# Figures: `python -m export.bench --batch 1,32 --variants none,float16,dynamic-int8,int8,int8-cpu`.
VARIANT_PER_DEVICE = (
    "Which for which device (TFLite time vs float32 at batch 1 / 32 on a CPU, one thread, and rel "
    "L2 at the defaults): a CPU (LiteRT's XNNPACK, onnxruntime) -> int8-cpu (int8 projections, "
    "the attention core in float32: 0.71x / 0.66x, 1.9e-2) or dynamic-int8 (0.69x / 0.70x, "
    "8.4e-3); an NPU, an integer DSP, TFLM -> int8 (integer only; 2.8x / 4.0x on a CPU, 2.5e-2); "
    "a GPU -> float16 (1.0x on a CPU, 2.4e-4). ONNX/ORT build their int8 (weight-only, float32 "
    "activations) for int8-cpu. docs/variants.md has the table")


def _integer_only(title: str):
    """`--quantize` of a format whose files are int8 only (TFLM): int8-cpu refused with why."""
    def parse(text: str) -> str:
        if text == "int8-cpu":
            raise argparse.ArgumentTypeError(
                f"{title} files are integer-only: int8-cpu keeps the attention core in float32 "
                f"for CPUs (export.tflite); use --quantize int8. Received: --quantize {text}")
        return text

    return parse


def tf2onnx_newest_opset() -> int | None:
    """The newest opset tf2onnx writes (`max(tf2onnx.constants.OPSET_TO_IR_VERSION)`), read from
    its source without importing it: importing tf2onnx imports TensorFlow, seconds that a
    builder's `--help` must not wait for. None when tf2onnx is not installed or its file changed
    shape (tests/test_cli.py holds it equal to the imported value)."""
    found = importlib.util.find_spec("tf2onnx")
    if found is None or not found.submodule_search_locations:
        return None
    path = os.path.join(list(found.submodule_search_locations)[0], "constants.py")
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "OPSET_TO_IR_VERSION" for t in node.targets):
            try:
                return max(ast.literal_eval(node.value))
            except (ValueError, TypeError):
                return None
    return None


def _default_opset_text() -> str:
    newest = tf2onnx_newest_opset()
    try:
        import onnx  # lazy: only a parser with --opset prints it (onnx itself loads in 0.1 s)

        newest = None if newest is None else min(newest, onnx.defs.onnx_opset_version())
    except ImportError:  # pragma: no cover - only for --help without onnx
        newest = None
    if newest is None:  # pragma: no cover - only for --help without tf2onnx
        return "the newest tf2onnx writes that onnxruntime runs"
    return f"{newest}, the newest tf2onnx writes that onnxruntime runs"

