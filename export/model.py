"""A user's whole Keras model as the reference (`--model PATH.keras`).

The model is loaded with Keras' `safe_mode` on (after the user's `--import` modules, so their
registered layers load). Its inputs and outputs give the artifact's names and static shapes. The
inference function traces the model as Keras runs it, with two changes: every weight is read as a
constant (Keras' `StatelessScope`: no variables for a converter to lose), and every
`CrossAttention` inside runs the folded computation of `export.graph.folded_attention` — the
same implementation as the lone layer's artifacts — with whatever masks reach it.

Here: the artifact's spec (ModelSpec) and the reference (ModelReference). Loading the file and
its sample inputs is export.model_load; the rewrites in force while tracing, export.model_rewrites.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from export.errors import ConversionError, ExportError, SpecError, first_line, one_line
from export.graph import NO_GRAPH_OPTIONS, FoldedWeights, GraphOptions, fold_weights
from export.model_load import _flat_outputs, _shape_text, _structured
from export.model_rewrites import (
    _broadcast_dense,
    _erf_gelu,
    _folded_cross_attention,
    _fusable_layer_norm,
    _fused_layer_norms,
    _plain_dense,
    _unrolled,
)
from export.names import check_name
from export.publish import sha256_path
from export.reference import GOLDEN_SEED
from export.spec import ArtifactNames, TensorInfo
from xattn import CrossAttention

log = logging.getLogger("export")


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
        check_name(self.stem)  # --name or the model file's stem: the same rule as the layer's
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
        return [TensorInfo(t.name, (self.batch, *t.shape), t.dtype, t.range) for t in self.model_inputs]

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
        origin: what a Keras 2 file was (`export.keras2.Keras2File`), or None.
    """

    kind = "model"

    def __init__(self, path: str, model: keras.Model, sample_inputs: dict | None = None,
                 sample_path: str | None = None, origin=None):
        self.path = path
        self.origin = origin
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
        """The reference beside the artifacts: the user's file itself, byte for byte; a Keras 2
        file as the Keras 3 model it was read as (Keras 3 cannot reload the original)."""
        if self.origin is not None:
            self.model.save(path)
        else:
            shutil.copyfile(self.path, path)

    def make_inputs(self, spec: ModelSpec, rows: int, seed: int) -> dict[str, np.ndarray]:
        return model_inputs(self.sample_inputs, spec, rows, seed)

    @property
    def parameters(self) -> int:
        return int(self.model.count_params())

    def run(self, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = [feeds[t.name] for t in spec.model_inputs]
        try:
            out = self.model(_structured(self.model, tensors), training=False)
        except tf.errors.InvalidArgumentError as e:
            # Values the model cannot take (an id past an Embedding deeper inside, an index out of
            # range): the inputs are at fault, not the converter; one line naming the layer.
            source = (f"--sample-inputs {self.sample_path}" if self.sample_path
                      else "the seeded inputs")
            text = re.sub(r"\{\{function_node [^}]*\}\}\s*|\x1b\[[0-9;]*m", "", str(e))
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            raise SpecError(f"the model refuses {source}: {one_line(' '.join(lines[:2]))}") from e
        names = [t.name for t in spec.model_outputs]
        return {n: np.asarray(o, dtype=np.float32) for n, o in zip(names, _flat_outputs(self.model, out))}

    def inference_function(self, spec: ModelSpec, *, fallback_layout: str,
                           options: GraphOptions = NO_GRAPH_OPTIONS):
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
                    _fused_layer_norms(layer_norms), _broadcast_dense(dense), _erf_gelu(), \
                    _folded_cross_attention(folded, fallback_layout, options, layouts):
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
                **({"keras2": self.origin.manifest_facts()} if self.origin is not None else {}),
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


def model_inputs(sample_inputs: dict | None, spec: ModelSpec, rows: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Inputs for `rows` samples: rows of `--sample-inputs` (the first ones for the golden
    vectors), else seeded N(0, 1) floats and padding masks."""
    if sample_inputs is not None:
        n = len(next(iter(sample_inputs.values())))
        if seed == GOLDEN_SEED:
            index = np.arange(rows) % n
        else:
            index = np.random.default_rng(seed).integers(0, n, size=rows)
        return {k: np.ascontiguousarray(v[index]) for k, v in sample_inputs.items()}
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
