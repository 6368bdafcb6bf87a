"""The one argparse parser every entry point shares; maps typed errors to exit codes.

Exit codes: 0 success; 1 an artifact failed verification (nothing published); 2 usage error
(bad flag, impossible configuration, bad calibration file, bad signing key); 3 a `--weights` file
that is missing, unsafe or does not fit; 4 a converter failed; 5 `--output-dir` cannot be written;
6 no space left on the device; 7 not enough memory; 8 `--arm`: qemu/mmdebstrap missing or a
download failed; 9 `--arm`: the emulated verifier crashed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from export import resources, signing
from export.buckets import parse_lengths
from export.deployment import summary as deployment_summary
from export.errors import INTERRUPTED_EXIT_CODE, ExportError, SpecError, WeightsError, reader_may_leave
from export.formats import FORMAT_NAMES, get_format
from export.spec import QUANTIZE_MODES, ArtifactSpec

log = logging.getLogger("export")
T = TypeVar("T")

SHAPE_DEFAULTS = {
    "units": 64, "heads": 4, "query_len": 10, "kv_len": 10, "query_features": 64, "kv_features": 64,
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit 2 (argparse prints the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_int_list(text: str) -> list[int]:
    """`1,8,32` -> [1, 8, 32]: positive integers, each once (for the benchmarks' sweeps)."""
    try:
        values = [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
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
        return _positive_int(text)
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
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or 'dynamic', got {text!r}") from None


def _lengths(text: str) -> tuple:
    try:
        return parse_lengths(text)
    except SpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_length_flags(args: argparse.Namespace, formats: tuple[str, ...]) -> str | None:
    """The usage error of a command line whose length flags do not fit together, or None."""
    lengths = getattr(args, "lengths", None)
    if lengths and (args.query_len is not None or args.kv_len is not None):
        given = "--query-len" if args.query_len is not None else "--kv-len"
        return (f"--lengths replaces --query-len and --kv-len; give one or the other. "
                f"Received: --lengths and {given}")
    if lengths and args.model is not None:
        return ("--lengths is for the lone layer: the length axes of a --model's inputs cannot "
                "be told apart from its other axes yet; export one file per length with "
                "--input-shape")
    if lengths and getattr(args, "calibration", None):
        return ("--lengths and --calibration cannot be combined: each signature is calibrated "
                "on seeded inputs of its own lengths")
    if lengths and getattr(args, "int8_io", False):
        return "--lengths and --int8-io cannot be combined: each signature would have its own scales"
    dynamic = [f for f, v in (("--query-len", args.query_len), ("--kv-len", args.kv_len))
               if v == "dynamic"]
    static = [f for f in formats if not get_format(f).dynamic_length]
    if dynamic and static:
        return (f"{get_format(static[0]).title} artifacts have static lengths ({dynamic[0]} "
                f"dynamic); for several lengths in one file use --lengths 16,64,256 (one "
                f"signature each)")
    return None


def _positive_float(text: str) -> float:
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
        shape = tuple(_positive_int(d.strip()) for d in dims.split(","))
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


def check_model_flags(args: argparse.Namespace) -> str | None:
    """The usage error of a command line mixing --model with the layer's flags, or None."""
    if args.model is None:
        given = [d for d in MODEL_FLAGS if getattr(args, d)]
        if given:
            return f"{_flag(given[0])} applies to --model only. Received: {_flag(given[0])} without --model"
        return None
    layer = [d for d in LAYER_FLAGS if getattr(args, d, None) not in (None, False)]
    if layer:
        return (f"--model and {_flag(layer[0])} cannot be combined: the model's inputs give the "
                f"shapes and it holds its weights. Received: --model {args.model} {_flag(layer[0])}")
    if getattr(args, "calibration", None):
        return ("--model and --calibration cannot be combined: pass calibration rows with "
                "--sample-inputs (one array per model input)")
    return None


def add_model_flags(group) -> None:
    """`--model` and the flags that go with it (shared with `python -m export.bench`)."""
    group.add_argument("--model", metavar="PATH.keras",
                       help="a functional or Sequential model saved with model.save(); loaded "
                            "with safe_mode on; its inputs and outputs name the artifact's")
    group.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                       help="import MODULE first (it registers your custom layers); repeatable")
    group.add_argument("--input-shape", dest="input_shapes", action="append", default=[],
                       type=_input_shape, metavar="NAME=D1,D2,...",
                       help="fix the unknown non-batch axes of input NAME; repeatable")
    group.add_argument("--sample-inputs", metavar="PATH.npz",
                       help="real inputs, one array per model input (N, ...): the golden vectors, "
                            "the verification rows and the int8 calibration data; needed for "
                            "integer inputs")


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
        epilog=(
            "exit codes: 0 ok; 1 verification failed (nothing published); 2 usage error; "
            "3 bad --weights file; 4 converter failure; 5 --output-dir not writable (a file, "
            "read-only); 6 disk full; 7 not enough memory; 8 --arm: qemu or mmdebstrap missing, a "
            "download failed; 9 --arm: the emulated verifier crashed; 130 interrupted"
        ),
    )
    shapes = parser.add_argument_group("layer and shapes")
    shapes.add_argument("--units", type=_positive_int, help="layer units (default 64)")
    shapes.add_argument("--heads", type=_positive_int, help="attention heads (default 4)")
    dynamic_length = [f for f in formats if get_format(f).dynamic_length]
    maybe_dynamic = (f" or 'dynamic' ({', '.join(dynamic_length)}: a symbolic axis)"
                     if dynamic_length else "")
    shapes.add_argument("--query-len", type=_length, metavar="N|dynamic" if dynamic_length else "N",
                        help=f"query length Tq (default 10){maybe_dynamic}")
    shapes.add_argument("--kv-len", type=_length, metavar="N|dynamic" if dynamic_length else "N",
                        help=f"key/value length Tkv (default 10){maybe_dynamic}")
    shapes.add_argument("--lengths", type=_lengths, metavar="L,L,...|QxKV,...",
                        help="several lengths in one artifact, e.g. 16,64,256 (Tq = Tkv) or "
                             "16x32,64x128: one signature per length (len_16 ...) plus "
                             "serving_default = the largest in TFLite and SavedModel, symbolic "
                             "lengths in ONNX; implies --query-mask --value-mask (pad requests "
                             "to their bucket); replaces --query-len/--kv-len")
    shapes.add_argument("--query-features", type=_positive_int,
                        help="source1 feature size (default 64)")
    shapes.add_argument("--kv-features", type=_positive_int,
                        help="source2 feature size (default 64)")
    defaults = ", ".join(
        f"{f} {'dynamic' if get_format(f).default_batch is None else get_format(f).default_batch}"
        for f in formats
    )
    shapes.add_argument("--batch", type=_batch, default=argparse.SUPPRESS, metavar="N|dynamic",
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
    weights.add_argument("--weights", metavar="PATH",
                         help="a .keras file holding a CrossAttention, or a .weights.h5 from "
                              "model.save_weights of a model built like the reference")
    weights.add_argument("--seed", type=_non_negative_int, default=0,
                         help="seed of the random weights when --weights is not given (default 0)")
    out = parser.add_argument_group("output and verification")
    out.add_argument("--output-dir", default="artifacts", metavar="DIR",
                     help="where artifacts are published (default artifacts/)")
    out.add_argument("--name", help="base file name (default derived from the configuration, "
                                    "e.g. xattn_u64_h4_q10x64_kv10x64)")
    out.add_argument("--sign-key", metavar="KEY.pem",
                     help="sign each published set (artifact, manifest, golden, reference) with "
                          "this elliptic-curve private key into <artifact>.sig (model-signing)")
    if any("opset" in get_format(f).build_options for f in formats):
        out.add_argument("--opset", type=_positive_int,
                         help=f"ONNX opset (default {_default_opset_text()})")
    atol_defaults = ", ".join(f"{f} {get_format(f).atol:g}" for f in formats)
    out.add_argument("--arm", action="store_true",
                     help="also run the files under aarch64 emulation (qemu; make verify-arm "
                          "installs it) and record in each manifest's deployment.arm where they "
                          "stay within their gate")
    out.add_argument("--atol", type=_positive_float,
                     help=f"max abs diff allowed vs the reference, float32 artifacts (default "
                          f"{atol_defaults}); variants gate on --max-rel-error")
    quantizable = [f for f in formats if get_format(f).quantizable]
    if quantizable:
        quant = parser.add_argument_group(f"quantized variants ({', '.join(quantizable)})")
        quant.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                           help="variant to build (default none = float32)"
                                + "".join(f"; {f} stays float32" for f in formats
                                          if not get_format(f).quantizable))
        quant.add_argument("--int8-io", action="store_true",
                           help="with --quantize int8 (TFLite): int8 inputs and outputs")
        quant.add_argument("--calibration", metavar="PATH.npz",
                           help="calibration inputs of TFLite --quantize int8: arrays source1, "
                                "source2 (ONNX/ORT int8 is weight-only and uses none)")
        quant.add_argument("--max-rel-error", type=_positive_float,
                           help="relative L2 gate of a variant (default float16 1e-3, "
                                "dynamic-int8 2.5e-2, int8 5e-2)")
    talk = parser.add_mutually_exclusive_group()
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    talk.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return parser


def _default_opset_text() -> str:
    try:  # lazy: tf2onnx imports TensorFlow; only a parser with --opset needs it
        import onnx
        from tf2onnx import constants

        newest = min(max(constants.OPSET_TO_IR_VERSION), onnx.defs.onnx_opset_version())
        return f"{newest}, the newest tf2onnx writes that onnxruntime runs"
    except Exception:  # pragma: no cover - only for --help without tf2onnx
        return "the newest tf2onnx writes that onnxruntime runs"


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    logger = logging.getLogger("export")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def resolve_request(args: argparse.Namespace, formats: tuple[str, ...]):
    """Flags (+ a --weights file) -> ExportRequest. Raises SpecError / WeightsError."""
    # lazy: both import Keras and TensorFlow; `--help` and export.verify's parser need neither.
    from export import reference
    from export.pipeline import ExportRequest

    if args.model is not None:
        return _model_request(args, formats)
    given = {k: getattr(args, k) for k in SHAPE_DEFAULTS if getattr(args, k) is not None}
    weights = None
    weights_source = None
    if args.weights:
        path = args.weights
        if path.endswith(".keras"):
            found = reference.load_keras_file(path)
            from_file = {
                "units": found.units, "heads": found.heads,
                "query_features": found.query_features, "kv_features": found.kv_features,
            }
            for key, value in from_file.items():
                flag = "--" + key.replace("_", "-")
                if key in given and given[key] != value:
                    raise SpecError(
                        f"{flag} {given[key]} contradicts {path}, whose CrossAttention has "
                        f"{key}={value}"
                    )
                given[key] = value
            weights = found.weights
        elif path.endswith(".h5"):
            weights = "h5"
        else:
            raise WeightsError(
                f"--weights must be a .keras or .weights.h5 file. Received: {path}"
            )
        weights_source = os.path.basename(path)
    shape_args = {**SHAPE_DEFAULTS, **given}
    for key in ("query_len", "kv_len"):
        if shape_args[key] == "dynamic":
            shape_args[key] = None
    quantize = getattr(args, "quantize", "none")
    common = dict(
        **shape_args,
        query_mask=args.query_mask, value_mask=args.value_mask, causal=args.causal,
        scores=args.scores, name=args.name or "", lengths=getattr(args, "lengths", None) or (),
    )
    specs = {}
    for fmt in formats:
        record = get_format(fmt)
        specs[fmt] = ArtifactSpec(
            **common, batch=_batch_for(args, fmt, formats),
            quantize=quantize if record.quantizable else "none",
            int8_io=bool(getattr(args, "int8_io", False)) and record.int8_io,
        )
    if weights == "h5":
        weights = reference.load_h5_weights(args.weights, next(iter(specs.values())))
    return ExportRequest(
        specs=specs,
        output_dir=args.output_dir,
        seed=args.seed,
        weights=weights,
        weights_source=weights_source,
        atol=args.atol,
        max_rel_error=getattr(args, "max_rel_error", None),
        opset=getattr(args, "opset", None),
        calibration=getattr(args, "calibration", None),
        sign_key=getattr(args, "sign_key", None),
    )


def _batch_for(args: argparse.Namespace, fmt: str, formats: tuple[str, ...]):
    """The batch of format `fmt`: --batch, or its default; a static format keeps its own."""
    record = get_format(fmt)
    batch = getattr(args, "batch", record.default_batch)
    if batch is None and not record.dynamic_batch:
        if formats == (fmt,):
            raise SpecError(
                f"{record.title} artifacts have a static batch; --batch dynamic is not "
                f"possible for {fmt}. Received: --batch dynamic"
            )
        dynamic = [f for f in formats if get_format(f).dynamic_batch]
        log.info("note     %s keeps a static batch of %d (--batch dynamic applies to %s)",
                 fmt, record.default_batch, " and ".join(dynamic))
        batch = record.default_batch
    return batch


def _model_request(args: argparse.Namespace, formats: tuple[str, ...]):
    """--model flags -> ExportRequest with ModelSpecs and the loaded model."""
    from export import model as user_model  # lazy: Keras and TensorFlow, after parsing
    from export.pipeline import ExportRequest

    user_model.import_modules(args.imports)
    keras_model = user_model.load_model(args.model)
    shapes = dict(args.input_shapes)
    inputs, outputs = user_model.model_tensors(keras_model, shapes)
    samples = (user_model.load_sample_inputs(args.sample_inputs, inputs)
               if args.sample_inputs else None)
    if samples is None:
        ints = [t.name for t in inputs if t.dtype not in ("float32", "bool")]
        if ints:
            raise SpecError(
                f"model input {ints[0]!r} is {next(t.dtype for t in inputs if t.name == ints[0])} "
                "(ids, categories): pass real inputs with --sample-inputs data.npz (one array per "
                "model input)")
    quantize = getattr(args, "quantize", "none")
    stem = args.name or user_model.default_stem(args.model)
    specs = {}
    for fmt in formats:
        record = get_format(fmt)
        specs[fmt] = user_model.ModelSpec(
            model_inputs=inputs, model_outputs=outputs, stem=stem, named=bool(args.name),
            batch=_batch_for(args, fmt, formats), quantize=quantize if record.quantizable else "none",
            int8_io=bool(getattr(args, "int8_io", False)) and record.int8_io,
        )
    reference = user_model.ModelReference(args.model, keras_model, samples, args.sample_inputs)
    return ExportRequest(
        specs=specs, output_dir=args.output_dir, atol=args.atol,
        max_rel_error=getattr(args, "max_rel_error", None), opset=getattr(args, "opset", None),
        model=reference, weights_source=os.path.basename(args.model),
        sign_key=getattr(args, "sign_key", None),
    )


def print_table(results) -> None:
    """The closing table on stdout: artifact, size, max abs diff, rel L2, placement (the
    manifest's `deployment`, export.deployment.summary), path."""
    rows = [("artifact", "size", "max abs diff", "rel L2", "placement", "path")]
    for r in results:
        rows.append((
            f"{r.format}{'' if r.spec.quantize == 'none' else ' ' + r.spec.quantize}",
            _human_size(r.bytes),
            f"{r.parity['max_abs']:.2e}",
            f"{r.parity['rel_l2']:.1e}",
            deployment_summary(r.manifest.get("deployment")),
            r.path,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _human_size(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MB"


def report_failures(prog: str, call: Callable[[], T], *,
                    interrupted: str = "interrupted") -> tuple[T | None, int]:
    """Run `call()`: a typed error or Ctrl-C becomes one line on stderr and its exit code.

    Returns `(result, 0)`, or `(None, exit code)`; every entry point's main() reports this way.
    """
    # From here on Ctrl-C raises KeyboardInterrupt, so staging folders are removed on the way out
    # (before, export/__init__ exits at once: nothing has been written yet).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return call(), 0
    except ExportError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return None, e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return None, INTERRUPTED_EXIT_CODE


def main(argv: list[str] | None = None, *, formats: tuple[str, ...] = FORMAT_NAMES,
         prog: str = "python -m export") -> int:
    parser = build_parser(formats, prog)
    args = parser.parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    if getattr(args, "int8_io", False) and getattr(args, "quantize", "none") != "int8":
        parser.error(f"--int8-io needs --quantize int8. Received: --quantize {args.quantize}")
    if getattr(args, "int8_io", False) and not any(get_format(f).int8_io for f in formats):
        # ONNX int8 is weight-only: float32 inputs and outputs; only TFLite files take int8 ones.
        parser.error("--int8-io applies to TFLite only; ONNX int8 files take and return float32")
    mixed = check_length_flags(args, formats) or check_model_flags(args)
    if mixed:
        parser.error(mixed)
    if getattr(args, "max_rel_error", None) is not None and getattr(args, "quantize", "none") == "none":
        parser.error("--max-rel-error gates a --quantize variant (float32 artifacts gate on "
                     "--atol). Received: --max-rel-error without --quantize")
    if args.name is not None and not args.name.strip():
        parser.error(f"--name must not be empty. Received: --name {args.name!r}")

    def export():
        from export.pipeline import export_artifacts  # lazy: TensorFlow, after parsing

        resources.check_output_dir(args.output_dir)
        if args.sign_key:  # a bad key fails before anything is built
            signing.load_signer(args.sign_key)
        if args.arm:  # so does a missing qemu or a failed download (cached in build/arm)
            from export import arm  # lazy: qemu's cache and the verifier, with --arm only

            arm.provision(arm.DEFAULT_CACHE)
        request = resolve_request(args, formats)
        request.arm = args.arm
        resources.check_memory(request.specs, parameters=(
            request.model.model.count_params() if request.model is not None else None))
        with resources.typed_os_errors(request.output_dir), resources.progress():
            return export_artifacts(request)

    results, code = report_failures(prog, export, interrupted="interrupted; nothing published")
    if code:
        return code
    if not args.quiet:
        with reader_may_leave():
            print_table(results)
    return 0
