"""A user's whole Keras model as the reference (`--model PATH.keras`).

The model is loaded with Keras' `safe_mode` on (after the user's `--import` modules, so their
registered layers load). Its inputs and outputs give the artifact's names and static shapes. The
inference function traces the model as Keras runs it, with two changes: every weight is read as a
constant (Keras' `StatelessScope`: no variables for a converter to lose), and every
`CrossAttention` inside runs the folded computation of `export.graph.folded_attention` — the
same implementation as the lone layer's artifacts — with whatever masks reach it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from export.errors import ConversionError, ExportError, SpecError, WeightsError, first_line
from export.graph import FoldedWeights, fold_weights, folded_attention, preferred_layout
from export.publish import sha256_path
from export.reference import GOLDEN_SEED
from export.spec import _NAME_RE, ArtifactNames, ArtifactSpec, TensorInfo
from xattn import CrossAttention

log = logging.getLogger("export")

# Dtypes a model input may have in an artifact, by what Keras reports.
_INPUT_DTYPES = {"float32": "float32", "bool": "bool", "int32": "int32", "int64": "int64"}


@dataclass(frozen=True)
class ModelSpec(ArtifactNames):
    """What decides a `--model` artifact: the model's tensors (axis 0 = `batch`), variant, name.

    The same naming interface as `export.spec.ArtifactSpec`, so the pipeline, the builders and
    the manifest treat both alike.
    """

    model_inputs: tuple[TensorInfo, ...]  # shapes without the batch axis
    model_outputs: tuple[TensorInfo, ...]
    stem: str  # the base name: --name, or the model file's name
    batch: int | None = None
    quantize: str = "none"
    int8_io: bool = False
    name: str = field(default="")
    named: bool = False  # --name given: used as it is, no batch suffix

    def __post_init__(self):
        if self.batch is not None and (isinstance(self.batch, bool) or self.batch <= 0):
            raise SpecError(f"`batch` must be a positive integer or None. Received: {self.batch!r}")
        if self.int8_io and self.quantize != "int8":
            raise SpecError(f"`int8_io` needs quantize='int8'. Received: quantize={self.quantize!r}")
        name = self.stem if self.named or self.batch in (None, 1) else f"{self.stem}_b{self.batch}"
        object.__setattr__(self, "name", name)

    # A model has one length per input, fixed by the model (`--lengths` is refused with --model).
    lengths: tuple = ()
    dynamic_lengths = False

    def replace(self, **changes) -> ModelSpec:
        changes.pop("name", None)
        return dataclasses.replace(self, **changes)

    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, (self.batch, *t.shape), t.dtype) for t in self.model_inputs]

    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(t.name, (self.batch, *t.shape), t.dtype) for t in self.model_outputs]

    def describe(self) -> str:
        def text(infos):
            return ", ".join(f"{t.name} {_shape_text(t.shape)}" for t in infos)

        batch = "dynamic" if self.batch is None else self.batch
        out = f"model {self.stem}: {text(self.inputs())} -> {text(self.outputs())} batch={batch}"
        if self.quantize != "none":
            out += f" quantize={self.quantize}" + (" int8-io" if self.int8_io else "")
        return out


def _shape_text(shape) -> str:
    return "(" + ", ".join("B" if i == 0 else str(d) for i, d in enumerate(shape)) + ")"


# -- loading -----------------------------------------------------------------------------------


def import_modules(names: list[str]) -> None:
    """Import the user's modules (`--import`), so their registered custom layers load."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is one line
            raise SpecError(f"--import {name} failed: {type(e).__name__}: {first_line(e)}") from e


def load_model(path: str) -> keras.Model:
    """The user's model, loaded with safe_mode on. WeightsError (exit 3) when it cannot be."""
    if not os.path.exists(path):
        raise WeightsError(f"--model file not found: {path}")
    if not os.path.isfile(path):
        raise WeightsError(f"--model must be a .keras file, got a folder: {path}")
    if not path.endswith(".keras") or not zipfile.is_zipfile(path):
        raise WeightsError(f"--model must be a .keras archive (model.save('x.keras')). Received: {path}")
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types; the user needs the file and the reason.
        text = str(e)
        reason = first_line(e)
        if "lambda" in text.lower() and "safe_mode" in text.lower():
            reason = ("it holds a Lambda layer (arbitrary Python code), refused with safe_mode on; "
                      "replace it with a registered layer and pass its module with --import")
        elif "Could not locate" in text or "Unknown layer" in text or "unknown" in text.lower():
            reason += " (a custom layer? pass the module that registers it with --import)"
        raise WeightsError(f"--model file {path} could not be loaded safely: {reason}") from e
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        raise WeightsError(
            f"--model file {path} holds a {type(model).__name__} without symbolic inputs; export "
            "a functional or Sequential model built on keras.Input"
        )
    return model


def model_tensors(model: keras.Model, input_shapes: dict[str, tuple[int, ...]]
                  ) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """(inputs, outputs) without the batch axis; every other axis must be known or given."""
    names = [t.name for t in model.inputs]
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise SpecError(
            f"--input-shape names {', '.join(unknown)}, which the model does not have; its "
            f"inputs are {', '.join(names)}"
        )
    inputs = []
    for tensor in model.inputs:
        dtype = _INPUT_DTYPES.get(keras.backend.standardize_dtype(tensor.dtype))
        if dtype is None:
            raise SpecError(f"model input {tensor.name!r} has dtype {tensor.dtype}; artifacts take "
                            f"{', '.join(_INPUT_DTYPES)}")
        shape = tuple(tensor.shape[1:])
        if tensor.name in input_shapes:
            given = input_shapes[tensor.name]
            fits = len(given) == len(shape) and all(s is None or s == g for s, g in zip(shape, given))
            if not fits:
                raise SpecError(
                    f"--input-shape {tensor.name}={','.join(map(str, given))} does not fit the "
                    f"model's input {tensor.name} of shape {_shape_text((None, *shape))}"
                )
            shape = tuple(given)
        if any(d is None for d in shape):
            raise SpecError(
                f"model input {tensor.name!r} has shape {_shape_text((None, *shape)).replace('None', '?')}"
                f" with unknown axes besides the batch; fix them with --input-shape "
                f"{tensor.name}=" + ",".join("D" if d is None else str(d) for d in shape)
            )
        inputs.append(TensorInfo(tensor.name, shape, dtype))
    symbolic = _symbolic_outputs(model, inputs)
    outputs = []
    for name, spec in zip(output_names(model), symbolic):
        shape = tuple(spec.shape[1:])
        if any(d is None for d in shape):
            raise SpecError(f"model output {name!r} has an unknown axis besides the batch: "
                            f"{_shape_text((None, *shape))}")
        outputs.append(TensorInfo(name, shape, "float32"))
    return tuple(inputs), tuple(outputs)


def _symbolic_outputs(model: keras.Model, inputs: list[TensorInfo]) -> list:
    """The outputs' shapes for the (fixed) input shapes, flattened in `output_names` order."""
    structure = [keras.KerasTensor((1, *t.shape), dtype=t.dtype, name=t.name) for t in inputs]
    out = model.compute_output_spec(_structured(model, structure))
    return _flat_outputs(model, out)


def output_names(model: keras.Model) -> list[str]:
    """The artifact's output names: the model's, or `output` for a single unnamed one.

    A single output whose name Keras generated (the layer's class in snake case, `dense_3`) is
    called `output`; a dict of outputs keeps its keys.
    """
    struct = getattr(model, "_outputs_struct", model.outputs)
    if isinstance(struct, dict):
        return list(struct)
    names = list(model.output_names)
    if len(names) == 1:
        layer = model.outputs[0]._keras_history[0]
        generated = re.sub(r"(?<!^)(?=[A-Z])", "_", type(layer).__name__).lower()
        if re.fullmatch(rf"{re.escape(generated)}(_\d+)?", names[0]):
            return ["output"]
    return names


def _structured(model: keras.Model, tensors: list):
    """`tensors` (in model.inputs order) in the structure the model was built with."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        by_name = {t.name: x for t, x in zip(model.inputs, tensors)}
        return {key: by_name[value.name] for key, value in struct.items()}
    if isinstance(struct, (list, tuple)):
        return list(tensors)
    return tensors[0]


def _flat_outputs(model: keras.Model, outputs) -> list:
    if isinstance(outputs, dict):
        return [outputs[k] for k in output_names(model)]
    if isinstance(outputs, (list, tuple)):
        return list(outputs)
    return [outputs]


# -- sample inputs -----------------------------------------------------------------------------


def load_sample_inputs(path: str, inputs: tuple[TensorInfo, ...]) -> dict[str, np.ndarray]:
    """`--sample-inputs` .npz: one array per model input (N, *shape), read without unpickling."""
    label = f"--sample-inputs file {path}"
    if not os.path.isfile(path):
        raise SpecError(f"{label} not found" if not os.path.exists(path) else f"{label} is not a file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as e:
        raise SpecError(f"{label}: holds Python objects (pickled data) or is damaged: "
                        f"{first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - zip, npy and OS errors alike: one line
        raise SpecError(f"{label} cannot be read as .npz: {first_line(e)}") from e
    names = [t.name for t in inputs]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise SpecError(f"{label} has no array {', '.join(missing)}; it needs one per model "
                        f"input ({', '.join(names)}), found {', '.join(sorted(arrays)) or 'none'}")
    rows = set()
    out = {}
    for t in inputs:
        array = arrays[t.name]
        if array.ndim != len(t.shape) + 1 or tuple(array.shape[1:]) != tuple(t.shape):
            raise SpecError(f"{label}: {t.name} has shape {array.shape}, expected "
                            f"(N, {', '.join(map(str, t.shape))})")
        kind = np.dtype(t.dtype).kind
        if (kind == "f" and array.dtype.kind != "f") or (kind in "iu" and array.dtype.kind not in "iu") \
                or (kind == "b" and array.dtype.kind != "b"):
            raise SpecError(f"{label}: {t.name} has dtype {array.dtype}, the model takes {t.dtype}")
        if kind == "f" and not np.isfinite(array).all():
            raise SpecError(f"{label}: {t.name} holds NaN or inf")
        rows.add(array.shape[0])
        out[t.name] = array.astype(t.dtype)
    if len(rows) != 1 or 0 in rows:
        raise SpecError(f"{label}: arrays disagree on the number of rows (or have none): {sorted(rows)}")
    return out


# -- the reference -----------------------------------------------------------------------------


@dataclass
class _Folded:
    layer: CrossAttention
    folded: FoldedWeights


class ModelReference:
    """The user's model: the reference every artifact of a `--model` export is verified against.

    Args:
        path: the `.keras` file (copied beside the artifacts as their reference).
        model: the loaded model.
        sample_inputs: `--sample-inputs` arrays, or None (float inputs drawn N(0, 1), bool
            inputs as padding masks; integer inputs need samples).
        sample_path: the file they came from.
    """

    kind = "model"

    def __init__(self, path: str, model: keras.Model, sample_inputs: dict | None = None,
                 sample_path: str | None = None):
        self.path = path
        self.model = model
        self.sample_inputs = sample_inputs
        self.sample_path = sample_path
        self.source = os.path.basename(path)
        self.sha256 = sha256_path(path)
        layers = _sublayers(model)
        self._folded = [_Folded(layer, _fold(layer)) for layer in layers
                        if isinstance(layer, CrossAttention)]
        self._weights = [v for v in model.weights
                         if not any(_owns(f.layer, v) for f in self._folded)]
        # Recurrent layers run unrolled over their static length: a loop would be a WHILE op
        # in TFLite (not static) and a Loop in ONNX.
        self.recurrent = [layer for layer in layers if isinstance(layer, keras.layers.RNN)]
        self.layer_norms = [layer for layer in layers if _fusable_layer_norm(layer)]
        self.dense = [layer for layer in layers if _plain_dense(layer)]
        self.layouts: dict[str, str] = {}

    def describe(self) -> str:
        names = ", ".join(f.layer.name for f in self._folded) or "none"
        return f"model {self.source} ({self.model.count_params()} parameters; folded: {names})"

    def save(self, path: str) -> None:
        """The reference beside the artifacts: the user's file itself, byte for byte."""
        shutil.copyfile(self.path, path)

    def make_inputs(self, spec: ModelSpec, rows: int, seed: int) -> dict[str, np.ndarray]:
        """Inputs for `rows` samples: rows of `--sample-inputs` (the first ones for the golden
        vectors), else seeded N(0, 1) floats and padding masks."""
        if self.sample_inputs is not None:
            n = len(next(iter(self.sample_inputs.values())))
            if seed == GOLDEN_SEED:
                index = np.arange(rows) % n
            else:
                index = np.random.default_rng(seed).integers(0, n, size=rows)
            return {k: np.ascontiguousarray(v[index]) for k, v in self.sample_inputs.items()}
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in spec.model_inputs:
            if t.dtype == "bool":
                length = t.shape[-1]
                lengths = rng.integers(1, length + 1, size=(rows, *t.shape[:-1], 1))
                feeds[t.name] = np.arange(length) < lengths
            elif np.dtype(t.dtype).kind in "iu":
                raise SpecError(f"model input {t.name!r} is {t.dtype} (ids, categories): pass real "
                                "inputs with --sample-inputs data.npz (one array per model input)")
            else:
                feeds[t.name] = rng.standard_normal((rows, *t.shape), dtype=np.float32)
        return feeds

    def run(self, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [feeds[t.name] for t in spec.model_inputs]
        out = self.model(_structured(self.model, tensors), training=False)
        names = [t.name for t in spec.model_outputs]
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(names, _flat_outputs(self.model, out))}

    def inference_function(self, spec: ModelSpec, *, fallback_layout: str,
                           mask_margin: float | None = None):
        """`(fn, layouts)`: a `tf.function` with the model's named inputs and a dict of its named
        outputs, and the head layout each folded CrossAttention got."""
        signature = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=t.name) for t in spec.inputs()]
        out_names = [t.name for t in spec.model_outputs]
        model, folded, layouts = self.model, self._folded, self.layouts
        values = [(v, np.asarray(keras.ops.convert_to_numpy(v))) for v in self._weights]

        out_shapes = [t.shape for t in spec.model_outputs]
        recurrent, layer_norms, dense = self.recurrent, self.layer_norms, self.dense

        def call(*tensors):
            # Created inside the trace, the weights are Const nodes of the graph.
            mapping = [(v, tf.constant(value)) for v, value in values]
            with keras.StatelessScope(state_mapping=mapping), _unrolled(recurrent), \
                    _fused_layer_norms(layer_norms), _broadcast_dense(dense), \
                    _folded_cross_attention(folded, fallback_layout, mask_margin, layouts):
                out = model(_structured(model, list(tensors)), training=False)
            # A constant-shape reshape states every non-batch axis: shape arithmetic inside
            # (Dense on a sequence with a dynamic batch) leaves converters unsure of them.
            return {n: tf.identity(tf.reshape(o, [-1 if spec.batch is None else spec.batch, *shape]),
                                   name=n)
                    for n, o, shape in zip(out_names, _flat_outputs(model, out), out_shapes)}

        fn = tf.function(call, input_signature=signature, autograph=False)
        try:
            fn.get_concrete_function()  # trace now: a model that cannot be traced fails here
        except Exception as e:
            raise ConversionError(f"tracing the model failed: {_layer_in(e, model)}") from e
        return fn, dict(layouts)

    def manifest_facts(self, spec: ModelSpec) -> dict:
        return {
            "model": {
                "file": spec.reference_name,
                "source": self.source,
                "sha256": self.sha256,
                "parameters": int(self.model.count_params()),
                "folded": [
                    {"layer": f.layer.name, "units": f.layer.units, "heads": f.layer.num_heads,
                     "layout": self.layouts.get(f.layer.name)}
                    for f in self._folded
                ],
                "unrolled": [layer.name for layer in self.recurrent],
                "rewritten": {
                    "layer_norm": [layer.name for layer in self.layer_norms],
                    "dense": [layer.name for layer in self.dense],
                },
            },
        }

    def explain(self, error: ExportError) -> ExportError:
        """A converter's or graph check's failure as one line naming the Keras layer (exit 4)."""
        reason = _layer_in(error, self.model)
        # The staging folder's path means nothing to the user: the file's name does.
        reason = re.sub(r"(?:/[^\s:/]+)*/\.xattn-staging-[^/\s]+/([^\s:/]+)", r"\1", reason)
        return ConversionError(f"{self.source} cannot be converted: {reason}")

    def scale_tolerance(self, tolerance: dict, outputs: dict[str, np.ndarray]) -> dict:
        """A float32 gate that means the same for outputs of any scale: atol * max(1, max|y|)."""
        if "atol" not in tolerance:
            return tolerance
        scale = max(1.0, max(float(np.max(np.abs(v))) for v in outputs.values()))
        return {"atol": tolerance["atol"] * scale}


def _sublayers(model: keras.Model) -> list:
    """Every layer inside `model`, nested ones included, depth first."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def _owns(layer, variable) -> bool:
    return any(variable is w for w in layer.weights)


def _fold(layer: CrossAttention) -> FoldedWeights:
    if keras.backend.standardize_dtype(layer.compute_dtype) != "float32":
        raise ConversionError(f"CrossAttention {layer.name!r} computes in {layer.compute_dtype}; "
                              "export float32 models (variants are made from them)")
    weights = [np.asarray(w) for w in layer.get_weights()]
    if not layer.use_bias:
        s1, s2, q, k, v, o = weights
        u, h = layer.units, layer.num_heads
        z = np.zeros
        weights = [s1, z(u), s2, z(u), q, z((h, u)), k, z((h, u)), v, z((h, u)), o, z(u)]
    return fold_weights(weights, layer.num_heads)


@contextlib.contextmanager
def _unrolled(layers: list) -> Iterator[None]:
    """While tracing, recurrent layers unroll over their (static) time axis."""
    before = [layer.unroll for layer in layers]
    for layer in layers:
        layer.unroll = True
    try:
        yield
    finally:
        for layer, unroll in zip(layers, before):
            layer.unroll = unroll


def _fusable_layer_norm(layer) -> bool:
    """A LayerNormalization over the last axis with scale and offset (the common one)."""
    if type(layer) is not keras.layers.LayerNormalization or layer.rms_scaling:
        return False
    if not (layer.center and layer.scale) or layer.compute_dtype != "float32":
        return False
    rank = len(layer.input.shape) if getattr(layer, "_inbound_nodes", None) else None
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    return rank is not None and [a % rank for a in axes] == [rank - 1]


@contextlib.contextmanager
def _fused_layer_norms(layers: list) -> Iterator[None]:
    """While tracing, LayerNormalization over the last axis is written the way converters fuse.

    Same arithmetic as Keras (mean, variance of the centred input, rsqrt(var + epsilon), scale,
    offset), in the order tf2onnx's layer-norm rewriter recognises: the ONNX file holds one
    LayerNormalization node instead of a dozen elementwise ones (onnxruntime runs it as one
    kernel). TFLite gets the same few builtin ops either way.
    """
    by_id = {id(layer) for layer in layers}
    original = keras.layers.LayerNormalization.call

    def call(self, inputs):
        if id(self) not in by_id:
            return original(self, inputs)
        mean = tf.reduce_mean(inputs, axis=[-1], keepdims=True)
        centered = inputs - mean
        variance = tf.reduce_mean(tf.pow(centered, 2.0), axis=[-1], keepdims=True)
        normed = centered / tf.sqrt(variance + self.epsilon)
        return normed * tf.convert_to_tensor(self.gamma) + tf.convert_to_tensor(self.beta)

    keras.layers.LayerNormalization.call = call
    try:
        yield
    finally:
        keras.layers.LayerNormalization.call = original


def _plain_dense(layer) -> bool:
    """A float32 Dense without LoRA or quantization (what `_broadcast_dense` rewrites)."""
    return (type(layer) is keras.layers.Dense and layer.compute_dtype == "float32"
            and not getattr(layer, "lora_enabled", False)
            and getattr(layer, "quantization_mode", None) is None)


@contextlib.contextmanager
def _broadcast_dense(layers: list) -> Iterator[None]:
    """While tracing, Dense on a sequence is one broadcasting matmul.

    Keras computes `(B, T, F) @ (F, U)` as a tensordot: reshapes through the input's run-time
    shape, which a dynamic batch turns into Shape/Gather/Concat/Cast nodes around every Dense.
    One MatMul broadcasts over B and T instead: onnxruntime runs it directly, and the TFLite
    converter makes it a FULLY_CONNECTED. Same arithmetic.
    """
    by_id = {id(layer) for layer in layers}
    original = keras.layers.Dense.call

    def call(self, inputs, training=None):
        if id(self) not in by_id or len(inputs.shape) < 3:
            return original(self, inputs, training=training)
        x = tf.matmul(inputs, tf.convert_to_tensor(self.kernel))
        if self.bias is not None:
            x = x + tf.convert_to_tensor(self.bias)
        return self.activation(x) if self.activation is not None else x

    keras.layers.Dense.call = call
    try:
        yield
    finally:
        keras.layers.Dense.call = original


@contextlib.contextmanager
def _folded_cross_attention(folded: list[_Folded], fallback_layout: str, mask_margin,
                            layouts: dict[str, str]) -> Iterator[None]:
    """While tracing, the listed CrossAttention layers run `folded_attention` instead of Keras'.

    The class's `call` is swapped for the duration (Keras looks `call` up at each call); any
    other CrossAttention (none, since every one is folded) would run as before.
    """
    by_id = {id(f.layer): f for f in folded}
    original = CrossAttention.call

    def call(self, inputs, training=False, *, attention_mask=None, query_mask=None,
             value_mask=None, use_causal_mask=False, return_attention_scores=False):
        entry = by_id.get(id(self))
        if entry is None:
            return original(self, inputs, training, attention_mask=attention_mask,
                            query_mask=query_mask, value_mask=value_mask,
                            use_causal_mask=use_causal_mask,
                            return_attention_scores=return_attention_scores)
        source1, source2 = inputs
        shape = ArtifactSpec(units=self.units, heads=self.num_heads,
                             query_len=int(source1.shape[1]), kv_len=int(source2.shape[1]),
                             query_features=int(source1.shape[2]),
                             kv_features=int(source2.shape[2]))
        layout = preferred_layout(shape, fallback_layout)
        layouts[self.name] = layout
        out, scores = folded_attention(
            source1, source2, entry.folded, layout=layout, batch=source1.shape[0],
            query_mask=query_mask, value_mask=value_mask, attention_mask=attention_mask,
            causal=bool(use_causal_mask), return_scores=return_attention_scores,
            mask_margin=mask_margin,
        )
        return (out, scores) if return_attention_scores else out

    CrossAttention.call = call
    try:
        yield
    finally:
        CrossAttention.call = original


def _layer_in(error: BaseException, model: keras.Model) -> str:
    """The converter's or tracer's reason, naming the Keras layer (and op) it points at.

    Converters name ops by their TensorFlow scope, `functional_1/inverse_1/MatrixInverse`: the
    Keras layer is the scope component that is a layer's name (with TensorFlow's `_N` suffix).
    """
    text = str(error)
    by_name = {layer.name: layer for layer in _sublayers(model)}
    op = None
    found = re.search(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text) or \
        re.search(r"TF Select ops: (\w+)", text) or re.search(r"op (\w+) is not an ONNX op", text)
    if found:
        op = found.group(1)
    for scope in re.findall(r"[\w.-]+(?:/[\w.-]+)+", text):
        for part in scope.split("/"):
            base = re.sub(r"_\d+$", "", part)
            for name in (part, base):
                if name in by_name:
                    what = first_line(error)
                    if op and "ONNX op" in text:
                        what = f"op {op} is not an ONNX op (tf2onnx has no conversion for it)"
                    elif op:
                        what = f"op {op} is not a TFLite builtin"
                    return f"layer {name!r} ({type(by_name[name]).__name__}): {what}"
    if op:
        return f"op {op} is not a TFLite builtin ({first_line(error)})"
    return first_line(error)


def default_stem(path: str) -> str:
    """An artifact base name from the model file's name (letters, digits, _ - .)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path)[: -len(".keras")]).strip("._-")
    stem = stem or "model"
    return stem if _NAME_RE.match(stem) else "model"
