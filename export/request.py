"""Parsed flags (+ a `--weights` or `--model` file) -> the pipeline's ExportRequest."""

from __future__ import annotations

import argparse
import logging
import os

from export.errors import SpecError, WeightsError
from export.flags import SHAPE_DEFAULTS, check_model_flags
from export.formats import get_format
from export.spec import ArtifactSpec

log = logging.getLogger("export")


def resolve_request(args: argparse.Namespace, formats: tuple[str, ...]):
    """Flags (+ a --weights file) -> ExportRequest. Raises SpecError / WeightsError."""
    # lazy: both import Keras and TensorFlow; `--help` and export.verify's parser need neither.
    from export import reference
    from export.pipeline import ExportRequest

    if getattr(args, "saved_model", None) is not None:
        return _saved_model_request(args, formats)
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
            quantize=_variant_for(fmt, quantize),
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
        sign_key=getattr(args, "sign_key", None), arena_limit=getattr(args, "arena_limit", None),
        arm=bool(getattr(args, "arm", False)),
    )


def _variant_for(fmt: str, quantize: str) -> str:
    """The variant format `fmt` builds for `--quantize`; a note where it is another one's file
    (ONNX/ORT build their int8 for int8-cpu: Format.same_variant)."""
    built = get_format(fmt).variant_for(quantize)
    if quantize in dict(get_format(fmt).same_variant):
        log.info("note     %s builds its %s file for --quantize %s (float32 activations already)",
                 fmt, built, quantize)
    return built


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
    from export import model_load
    from export.pipeline import ExportRequest

    model_load.import_modules(args.imports)
    keras_model, origin = model_load.load_model_file(args.model)
    shapes = dict(args.input_shapes)
    keras_model = model_load.functional_view(keras_model, shapes)
    inputs, outputs = model_load.model_tensors(keras_model, shapes)
    inputs = model_load.with_embedding_ranges(keras_model, inputs)
    samples = (model_load.load_sample_inputs(args.sample_inputs, inputs)
               if args.sample_inputs else None)
    if samples is not None:
        model_load.check_embedding_ranges(keras_model, samples, args.sample_inputs)
    if samples is None:
        ints = [t.name for t in inputs if t.dtype not in ("float32", "bool")]
        if ints:
            raise SpecError(
                f"model input {ints[0]!r} is {next(t.dtype for t in inputs if t.name == ints[0])} "
                "(ids, categories): pass real inputs with --sample-inputs data.npz (one array per "
                "model input)")
    quantize = getattr(args, "quantize", "none")
    stem = args.name or model_load.default_stem(args.model)
    specs = {}
    for fmt in formats:
        record = get_format(fmt)
        specs[fmt] = user_model.ModelSpec(
            model_inputs=inputs, model_outputs=outputs, stem=stem, named=bool(args.name),
            batch=_batch_for(args, fmt, formats), quantize=_variant_for(fmt, quantize),
            int8_io=bool(getattr(args, "int8_io", False)) and record.int8_io,
        )
    reference = user_model.ModelReference(args.model, keras_model, samples, args.sample_inputs,
                                          origin=origin)
    return ExportRequest(
        specs=specs, output_dir=args.output_dir, atol=args.atol,
        max_rel_error=getattr(args, "max_rel_error", None), opset=getattr(args, "opset", None),
        model=reference, weights_source=os.path.basename(args.model),
        sign_key=getattr(args, "sign_key", None), arena_limit=getattr(args, "arena_limit", None),
        arm=bool(getattr(args, "arm", False)),
    )


def _saved_model_request(args: argparse.Namespace, formats: tuple[str, ...]):
    """--saved-model flags -> ExportRequest with SavedModelSpecs and the loaded signature."""
    from export import model_load  # lazy: Keras, after parsing
    from export import saved_model_reference as saved  # lazy: TensorFlow, after parsing
    from export.pipeline import ExportRequest

    refused = check_model_flags(args, formats)  # the CLI's parser said so already
    if refused:
        raise SpecError(refused)
    key = args.signature or "serving_default"
    loaded, concrete = saved.load_signature(args.saved_model, key)
    inputs, outputs = saved.signature_tensors(concrete, dict(args.input_shapes))
    samples = (model_load.load_sample_inputs(args.sample_inputs, inputs)
               if args.sample_inputs else None)
    if samples is None:
        ints = [t for t in inputs if t.dtype not in ("float32", "bool")]
        if ints:
            raise SpecError(f"signature input {ints[0].name!r} is {ints[0].dtype} (ids, "
                            "categories): pass real inputs with --sample-inputs data.npz (one "
                            "array per input)")
    quantize = getattr(args, "quantize", "none")
    stem = args.name or saved.default_stem(args.saved_model)
    specs = {}
    for fmt in formats:
        record = get_format(fmt)
        specs[fmt] = saved.SavedModelSpec(
            model_inputs=inputs, model_outputs=outputs, stem=stem, named=bool(args.name),
            batch=_batch_for(args, fmt, formats), quantize=_variant_for(fmt, quantize),
            int8_io=bool(getattr(args, "int8_io", False)) and record.int8_io,
        )
    reference = saved.SavedModelReference(args.saved_model, key, loaded, concrete, samples,
                                          args.sample_inputs)
    return ExportRequest(
        specs=specs, output_dir=args.output_dir, atol=args.atol,
        max_rel_error=getattr(args, "max_rel_error", None), opset=getattr(args, "opset", None),
        model=reference, weights_source=reference.source,
        sign_key=getattr(args, "sign_key", None), arena_limit=getattr(args, "arena_limit", None),
        arm=bool(getattr(args, "arm", False)),
    )
