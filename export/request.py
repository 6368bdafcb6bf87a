"""Parsed flags (+ a `--weights` or `--model` file) -> the pipeline's ExportRequest."""

from __future__ import annotations

import argparse
import logging
import os

from export.errors import SpecError, WeightsError
from export.flags import FORMAT_BATCH, SHAPE_DEFAULTS, check_model_flags
from export.formats import get_format
from export.spec import ArtifactSpec, ExportRequest

log = logging.getLogger("export")


def resolve_request(args: argparse.Namespace, formats: tuple[str, ...]):
    """Flags (+ a --weights file) -> ExportRequest. Raises SpecError / WeightsError."""
    from export import reference  # lazy: Keras and TensorFlow; `--help` needs neither

    if args.saved_model is not None:
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
    quantize = args.quantize
    common = dict(
        **shape_args,
        query_mask=args.query_mask, value_mask=args.value_mask, causal=args.causal,
        scores=args.scores, name=args.name or "", lengths=args.lengths or (),
    )
    specs = {}
    for fmt in formats:
        record = get_format(fmt)
        specs[fmt] = ArtifactSpec(
            **common, batch=_batch_for(args, fmt, formats),
            quantize=_variant_for(fmt, quantize),
            int8_io=args.int8_io and record.int8_io,
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
        max_rel_error=args.max_rel_error,
        opset=args.opset,
        calibration=args.calibration,
        sign_key=args.sign_key, arena_limit=args.arena_limit,
        arm=args.arm,
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
    batch = record.default_batch if args.batch is FORMAT_BATCH else args.batch
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

    model_load.import_modules(args.imports)
    keras_model, origin = model_load.load_model_file(args.model)
    shapes = dict(args.input_shapes)
    keras_model = model_load.functional_view(keras_model, shapes)
    inputs, outputs = model_load.model_tensors(keras_model, shapes)
    inputs = model_load.with_embedding_ranges(keras_model, inputs)
    samples = _sample_inputs(args, inputs, "model input", "model input")
    if samples is not None:
        model_load.check_embedding_ranges(keras_model, samples, args.sample_inputs)
    specs = _whole_model_specs(user_model.ModelSpec, args, formats, inputs, outputs,
                               args.name or model_load.default_stem(args.model))
    reference = user_model.ModelReference(args.model, keras_model, samples, args.sample_inputs,
                                          origin=origin)
    return _whole_model_request(args, specs, reference, os.path.basename(args.model))


def _saved_model_request(args: argparse.Namespace, formats: tuple[str, ...]):
    """--saved-model flags -> ExportRequest with SavedModelSpecs and the loaded signature."""
    from export import saved_model_reference as saved  # lazy: TensorFlow, after parsing

    refused = check_model_flags(args, formats)  # the CLI's parser said so already
    if refused:
        raise SpecError(refused)
    key = args.signature or "serving_default"
    loaded, concrete = saved.load_signature(args.saved_model, key)
    inputs, outputs = saved.signature_tensors(concrete, dict(args.input_shapes))
    samples = _sample_inputs(args, inputs, "signature input", "input")
    specs = _whole_model_specs(saved.SavedModelSpec, args, formats, inputs, outputs,
                               args.name or saved.default_stem(args.saved_model))
    reference = saved.SavedModelReference(args.saved_model, key, loaded, concrete, samples,
                                          args.sample_inputs)
    return _whole_model_request(args, specs, reference, reference.source)


def _sample_inputs(args: argparse.Namespace, inputs, what: str, per: str) -> dict | None:
    """`--sample-inputs` read against `inputs`; without it, SpecError where an input takes ids
    (integers cannot be drawn at random)."""
    from export import model_load  # lazy: Keras, after parsing

    if args.sample_inputs:
        return model_load.load_sample_inputs(args.sample_inputs, inputs)
    ints = [t for t in inputs if t.dtype not in ("float32", "bool")]
    if ints:
        raise SpecError(f"{what} {ints[0].name!r} is {ints[0].dtype} (ids, categories): pass real "
                        f"inputs with --sample-inputs data.npz (one array per {per})")
    return None


def _whole_model_specs(spec_cls, args: argparse.Namespace, formats: tuple[str, ...], inputs,
                       outputs, stem: str) -> dict:
    """One spec of a whole model (`--model`, `--saved-model`) per format."""
    quantize = args.quantize
    return {
        fmt: spec_cls(
            model_inputs=inputs, model_outputs=outputs, stem=stem, named=bool(args.name),
            batch=_batch_for(args, fmt, formats), quantize=_variant_for(fmt, quantize),
            int8_io=args.int8_io and get_format(fmt).int8_io,
        )
        for fmt in formats
    }


def _whole_model_request(args: argparse.Namespace, specs: dict, reference, weights_source: str):
    return ExportRequest(
        specs=specs, output_dir=args.output_dir, atol=args.atol,
        max_rel_error=args.max_rel_error, opset=args.opset,
        model=reference, weights_source=weights_source,
        sign_key=args.sign_key, arena_limit=args.arena_limit,
        arm=args.arm,
    )
