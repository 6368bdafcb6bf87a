"""A TensorFlow SavedModel's signature as the reference (`--saved-model DIR --signature NAME`).

For models that cannot run under this project's Keras (fusionlab-learn's XTFT and HALNet, saved
under TF 2.15 with `tf.Module` + one `tf.function`, or with Keras' `model.export()`): the
signature's inputs and outputs name the artifact's, and every artifact is verified against the
signature run under TensorFlow. Same protocol as `export.model.ModelReference`; nothing is folded
or rewritten (the graph is the user's), so the inference function calls the signature as it is.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from export.errors import ConversionError, ExportError, SpecError, WeightsError, first_line
from export.graph import NO_GRAPH_OPTIONS, GraphOptions
from export.model import ModelSpec, model_inputs
from export.model_load import _INPUT_DTYPES, _shape_text
from export.names import is_valid_name
from export.spec import TensorInfo

log = logging.getLogger("export")

# A fixed timestamp for every entry of the reference zip: the same SavedModel, the same bytes.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class SavedModelSpec(ModelSpec):
    """A ModelSpec whose reference is the SavedModel folder zipped (`<name>.savedmodel.zip`).

    Its graph is the user's: the graph checks let it loop and read shapes (`user_graph`).
    """

    user_graph = True

    @property
    def reference_name(self) -> str:
        return f"{self.name}.savedmodel.zip"


def load_signature(path: str, signature: str):
    """`(loaded, concrete function)` of signature `signature` of the SavedModel in `path`.

    Raises:
        WeightsError (exit 3): not a folder, not a SavedModel, unreadable, or no such signature
        (naming the ones it has).
    """
    label = f"--saved-model {path}"
    if not os.path.exists(path):
        raise WeightsError(f"{label}: folder not found")
    if not os.path.isdir(path):
        raise WeightsError(f"{label} is a file; --saved-model takes the SavedModel's folder (the "
                           "one holding saved_model.pb)")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        raise WeightsError(f"{label} is not a SavedModel: it holds no saved_model.pb")
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf, checkpoint and op errors alike: one line
        raise WeightsError(f"{label} could not be loaded: {type(e).__name__}: {first_line(e)}") from e
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if signature not in signatures:
        have = ", ".join(sorted(signatures)) or "none"
        raise WeightsError(f"{label} has no signature {signature!r}; its signatures: {have}")
    return loaded, signatures[signature]


def signature_tensors(concrete, input_shapes: dict[str, tuple[int, ...]]
                      ) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """(inputs, outputs) without the batch axis, from the signature; unknown axes fixed by
    `--input-shape`, the outputs' by running the signature once on zeros."""
    args, specs = concrete.structured_input_signature
    if args:
        raise SpecError("the signature takes positional inputs; export one with named inputs "
                        "(tf.function(input_signature=[tf.TensorSpec(..., name=...)]))")
    # Sorted by name: a loaded signature's order comes from a protobuf map (it may change from
    # one load to the next); TensorFlow flattens its inputs in this order too.
    specs = dict(sorted(specs.items()))
    names = list(specs)
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise SpecError(f"--input-shape names {', '.join(unknown)}, which the signature does not "
                        f"have; its inputs are {', '.join(names)}")
    inputs = []
    for name, spec in specs.items():
        dtype = _INPUT_DTYPES.get(spec.dtype.name)
        if dtype is None:
            raise SpecError(f"signature input {name!r} has dtype {spec.dtype.name}; artifacts take "
                            f"{', '.join(_INPUT_DTYPES)}")
        if spec.shape.rank is None or spec.shape.rank == 0:
            raise SpecError(f"signature input {name!r} has no batch axis (shape {spec.shape}); "
                            "artifacts take (batch, ...) inputs")
        shape = tuple(spec.shape.as_list()[1:])
        if name in input_shapes:
            given = input_shapes[name]
            fits = len(given) == len(shape) and all(s is None or s == g for s, g in zip(shape, given))
            if not fits:
                raise SpecError(f"--input-shape {name}={','.join(map(str, given))} does not fit the "
                                f"signature's input {name} of shape {_shape_text((None, *shape))}")
            shape = tuple(given)
        if any(d is None for d in shape):
            raise SpecError(
                f"signature input {name!r} has shape {_shape_text((None, *shape)).replace('None', '?')}"
                f" with unknown axes besides the batch; fix them with --input-shape {name}="
                + ",".join("D" if d is None else str(d) for d in shape))
        inputs.append(TensorInfo(name, shape, dtype))
    # The outputs' shapes at these input shapes, from a trace (nothing runs).
    names = [t.name for t in inputs]
    traced = tf.function(
        lambda *tensors: concrete(**dict(zip(names, tensors))),
        input_signature=[tf.TensorSpec((1, *t.shape), tf.as_dtype(t.dtype), name=t.name)
                         for t in inputs], autograph=False)
    try:
        result = traced.get_concrete_function().structured_outputs
    except Exception as e:  # noqa: BLE001 - whatever the user's graph raises: one line
        raise SpecError(f"the signature cannot be traced at input shapes "
                        f"{ {t.name: (1, *t.shape) for t in inputs} }: {first_line(e)}") from e
    outputs = []
    for name, value in sorted(result.items()):
        if value.dtype != tf.float32:
            raise SpecError(f"signature output {name!r} is {value.dtype.name}; artifacts return "
                            "float32 outputs")
        if value.shape.rank is None or value.shape.rank == 0 or value.shape[0] not in (1, None):
            raise SpecError(f"signature output {name!r} has no batch axis (shape {value.shape})")
        shape = tuple(value.shape.as_list()[1:])
        if any(d is None for d in shape):
            raise SpecError(f"signature output {name!r} has an unknown axis besides the batch: "
                            f"{_shape_text((None, *shape))}")
        outputs.append(TensorInfo(name, shape, "float32"))
    return tuple(inputs), tuple(outputs)


def default_stem(path: str) -> str:
    """An artifact base name from the SavedModel folder's name."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(path))).strip("._-")
    stem = re.sub(r"[_.-]?saved_?model$", "", stem, flags=re.IGNORECASE) or stem
    return stem if is_valid_name(stem) else "saved_model"


def saved_by(path: str) -> str | None:
    """The TensorFlow version that wrote the SavedModel (its meta graph says), or None."""
    try:
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto = saved_model_pb2.SavedModel.FromString(f.read())
        return proto.meta_graphs[0].meta_info_def.tensorflow_version or None
    except Exception:  # noqa: BLE001 - a fact for the manifest, not a reason to fail
        return None


def write_reference_zip(folder: str, path: str) -> None:
    """The SavedModel folder as one zip, entries sorted, fixed timestamps: same folder, same bytes."""
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        entries += [os.path.join(root, f) for f in sorted(files)]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for entry in entries:
            info = zipfile.ZipInfo(os.path.relpath(entry, folder).replace(os.sep, "/"), _ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(entry, "rb") as f:
                archive.writestr(info, f.read())


class SavedModelReference:
    """A SavedModel signature: the reference of a `--saved-model` export.

    Args:
        path: the SavedModel folder (zipped beside the artifacts as their reference).
        signature_key: the signature's name (`serving_default`).
        loaded: the loaded SavedModel; concrete: its signature.
        sample_inputs: `--sample-inputs` arrays, or None (float inputs drawn N(0, 1)).
        sample_path: the file they came from.
    """

    kind = "saved_model"

    def __init__(self, path: str, signature_key: str, loaded, concrete,
                 sample_inputs: dict | None = None, sample_path: str | None = None):
        self.path = path
        self.signature_key = signature_key
        self.loaded = loaded
        self.signature = concrete
        self.sample_inputs = sample_inputs
        self.sample_path = sample_path
        self.source = os.path.basename(os.path.normpath(path))
        self.variables = list(concrete.variables)
        self.parameters = int(sum(np.prod(v.shape) for v in self.variables))
        self.tensorflow = saved_by(path)
        self.layouts: dict[str, str] = {}

    def describe(self) -> str:
        saved = f", saved by TensorFlow {self.tensorflow}" if self.tensorflow else ""
        return (f"SavedModel {self.source} signature {self.signature_key} "
                f"({self.parameters} parameters{saved})")

    def save(self, path: str) -> None:
        write_reference_zip(self.path, path)

    def make_inputs(self, spec: ModelSpec, rows: int, seed: int) -> dict[str, np.ndarray]:
        return model_inputs(self.sample_inputs, spec, rows, seed)

    def run(self, spec: ModelSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.signature(**{t.name: tf.constant(feeds[t.name]) for t in spec.model_inputs})
        return {t.name: np.asarray(out[t.name], dtype=np.float32) for t in spec.model_outputs}

    def inference_function(self, spec: ModelSpec, *, fallback_layout: str,
                           options: GraphOptions = NO_GRAPH_OPTIONS):
        """`(fn, {})`: a `tf.function` at the spec's batch calling the signature as it is.

        The signature's variables stay variables (freezing them into constants loses the
        `tf._implements` marks the TFLite converter turns into its fused LSTM): `fn.trackables`
        lists them, so a builder saving `fn` saves them with it.
        """
        del fallback_layout, options  # nothing is folded in a SavedModel's graph
        signature = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype), name=t.name) for t in spec.inputs()]
        names = [t.name for t in spec.model_inputs]
        outputs = [(t.name, t.shape) for t in spec.model_outputs]
        concrete, batch = self.signature, -1 if spec.batch is None else spec.batch

        constants = [None if c.dtype == tf.resource else c.numpy() for c in concrete.captured_inputs]

        def call(*tensors):
            # Captured tensors that are not variables (a positional-encoding table) become
            # constants of this graph: tf2onnx would otherwise make each one a graph input.
            captured = [c if value is None else tf.constant(value)
                        for c, value in zip(concrete.captured_inputs, constants)]
            flat = tf.nest.flatten(concrete.structured_input_signature[1])
            by_name = dict(zip(names, tensors))
            args = [by_name[spec.name] for spec in flat]
            out = concrete._call_flat(args, captured_inputs=captured)
            if not isinstance(out, dict):  # a TensorFlow whose _call_flat returns flat outputs
                out = tf.nest.pack_sequence_as(concrete.structured_outputs, out)
            return {n: tf.identity(tf.reshape(out[n], [batch, *shape]), name=n) for n, shape in outputs}

        fn = tf.function(call, input_signature=signature, autograph=False)
        fn.trackables = self.variables
        try:
            fn.get_concrete_function()
        except Exception as e:
            raise ConversionError(f"calling the signature at batch {spec.batch or 'dynamic'} "
                                  f"failed: {first_line(e)}") from e
        return fn, {}

    def manifest_facts(self, spec: ModelSpec) -> dict:
        return {
            "saved_model": {
                "file": spec.reference_name,
                "source": self.source,
                "signature": self.signature_key,
                "parameters": self.parameters,
                "tensorflow": self.tensorflow,
            },
        }

    def explain(self, error: ExportError) -> ExportError:
        """A converter's or graph check's failure as one line naming the ops (exit 4)."""
        text = str(error)
        ops = sorted(set(re.findall(r"'tf\.(\w+)' op is neither a custom op nor a flex op", text))
                     | set(re.findall(r"op (\w+) is not an ONNX op", text)))
        found = re.search(r"TF Select ops: ([\w, ]+)", text)
        if found:
            ops = sorted(set(ops) | {o.strip() for o in found.group(1).split(",") if o.strip()})
        reason = re.sub(r"(?:/[^\s:/]+)*/\.xattn-staging-[^/\s]+/([^\s:/]+)", r"\1", first_line(error))
        if ops:
            reason = f"ops {', '.join(ops)} have no builtin conversion ({reason})"
        return ConversionError(f"SavedModel {self.source} signature {self.signature_key} cannot "
                               f"be converted: {reason}")

    def scale_tolerance(self, tolerance: dict, outputs: dict[str, np.ndarray]) -> dict:
        if "atol" not in tolerance:
            return tolerance
        scale = max(1.0, max(float(np.max(np.abs(v))) for v in outputs.values()))
        return {"atol": tolerance["atol"] * scale}
