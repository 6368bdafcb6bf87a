"""Model files saved by Keras 2 (TensorFlow <= 2.15), fusionlab-learn's among them, read by Keras 3.

`--model` takes a Keras 2 `.keras` archive or legacy `.h5` model file as it takes a Keras 3 one.
The saved config is translated where Keras 3 differs — class paths (`keras.src.engine.functional`),
`MultiHeadAttention`'s shapes and keyword `value`, legacy node lists, keys Keras 3 does not take
that change nothing at inference — TensorFlow functions called on Keras 2 tensors (`TFOpLambda`)
run with keras.ops from a fixed list, and fusionlab-learn's `CrossAttention`, whose config has no
`num_heads`, becomes `xattn.CrossAttention` with the heads read from its query kernel
`(units, heads, units)`. The model is then rebuilt with Keras' `safe_mode` on and its weights
loaded from the file. No fusionlab install, no `--import`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field

import h5py
import keras

from export.errors import WeightsError
from xattn import CrossAttention

# Keras 2 model classes and the Keras 3 class each is: (module, class_name, registered_name).
_MODEL_CLASSES = {"Functional": ("keras.src.models.functional", "Functional", "Functional"),
                  "Model": ("keras.src.models.functional", "Functional", "Functional"),
                  "Sequential": ("keras", "Sequential", None)}
# fusionlab-learn's CrossAttention, by the module or registered name a Keras 2 file gives it.
_FUSIONLAB_CROSS_ATTENTION = re.compile(r"^fusionlab(\.[\w.]+)?(>|\.)CrossAttention$")
_TENSOR_REF = "__keras_tensor__"
SAVED_MODEL_HINT = ("write a SavedModel of it in its own (Keras 2) environment and export that with "
                    "--saved-model DIR (docs/fusionlab.md)")


@dataclass
class Keras2File:
    """What a Keras 2 model file was: the Keras version that saved it, its format, and the
    fusionlab-learn layers found in it (name, units, heads)."""

    path: str
    keras_version: str
    format: str  # "keras" (zip archive) or "h5" (legacy HDF5 model file)
    fusionlab_layers: list[dict] = field(default_factory=list)

    def manifest_facts(self) -> dict:
        return {"saved_by": f"Keras {self.keras_version}", "format": self.format,
                "fusionlab_layers": list(self.fusionlab_layers)}


# -- what a file is ----------------------------------------------------------------------------


def keras_version(path: str) -> tuple[str, str] | None:
    """(format, the Keras version that saved `path`) for a .keras or .h5 model file, or None
    when the file does not say (not a model file: the caller's checks report it)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                metadata = json.loads(archive.read("metadata.json"))
            return "keras", str(metadata.get("keras_version", ""))
        except (KeyError, ValueError, OSError, zipfile.BadZipFile):
            return None
    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                version = f.attrs.get("keras_version")
                if f.attrs.get("model_config") is None:
                    return None
        except OSError:
            return None
        if isinstance(version, bytes):
            version = version.decode("utf-8", "replace")
        return "h5", str(version or "")
    return None


def is_keras2(version: str) -> bool:
    return bool(re.match(r"^[12]\.", version))


# -- translating the config --------------------------------------------------------------------


def translate_config(config: dict, heads: dict[str, int], path: str) -> tuple[dict, list[dict]]:
    """A Keras 2 model config as Keras 3 reads it, and the fusionlab layers found.

    `heads` gives the heads of each fusionlab CrossAttention by layer name (read from the
    weights). Pure: the config is copied, nothing is imported.
    """
    config = json.loads(json.dumps(config))
    found: list[dict] = []
    _translate_model(config, heads, path, found)
    return config, found


def _class_path(obj: dict) -> str:
    module = obj.get("module")
    name = obj.get("class_name", "?")
    return f"{module}.{name}" if module else str(name)


def _translate_model(config: dict, heads: dict, path: str, found: list) -> None:
    class_name = config.get("class_name")
    registered = config.get("registered_name") or ""
    module = config.get("module") or ""
    if class_name not in _MODEL_CLASSES or not (module.startswith("keras") or not module) or \
            (registered and registered not in (class_name, f"keras>{class_name}")
             and not registered.startswith("keras")):
        raise WeightsError(
            f"--model file {path} was saved by Keras 2 and holds {_class_path(config)}, a "
            f"subclassed model Keras 3 cannot rebuild from its config: {SAVED_MODEL_HINT}"
        )
    config["module"], config["class_name"], config["registered_name"] = _MODEL_CLASSES[class_name]
    config.pop("compile_config", None)  # the model is only run: no optimizer, no loss
    inner = config.setdefault("config", {})
    for layer in inner.get("layers", []):
        _translate_layer(layer, heads, path, found)
    if config["class_name"] == "Functional":
        for layer in inner.get("layers", []):
            keep = layer.get("class_name") == "TFOpLambda"
            layer["inbound_nodes"] = [_translate_node(node, keep)
                                      for node in layer.get("inbound_nodes", [])]


def _translate_layer(layer: dict, heads: dict, path: str, found: list) -> None:
    class_name = str(layer.get("class_name", ""))
    module = layer.get("module") or ""
    registered = layer.get("registered_name") or ""
    cfg = layer.setdefault("config", {})
    name = cfg.get("name", layer.get("name"))
    if any(_FUSIONLAB_CROSS_ATTENTION.match(text) for text in
           (class_name, registered, f"{module}.{class_name}")):
        _as_xattn(layer, name, heads, path)
        found.append({"layer": name, "class": "fusionlab.nn.components.CrossAttention",
                      "units": layer["config"]["units"], "heads": layer["config"]["num_heads"]})
        return
    if class_name in _MODEL_CLASSES and "layers" in cfg:  # a nested functional/Sequential model
        _translate_model(layer, heads, path, found)
        return
    if (module and not module.startswith("keras")) or ">" in class_name:
        what = _class_path(layer) if module else class_name.replace(">", ".")
        if keras.saving.get_registered_object(registered or class_name) is None:
            raise WeightsError(
                f"--model file {path} was saved by Keras 2 and holds layer {name!r} of class "
                f"{what}, which Keras 3 cannot rebuild: {SAVED_MODEL_HINT}"
            )
        return
    if not module:
        layer["module"] = "keras.layers"
    if class_name == "Lambda":
        raise WeightsError(
            f"--model file {path} was saved by Keras 2 and holds layer {name!r}, a Lambda layer "
            "(arbitrary Python code), refused with safe_mode on: replace it with a Keras layer, "
            f"or {SAVED_MODEL_HINT}"
        )
    if class_name == "MultiHeadAttention":
        _translate_multi_head_attention(layer)
    elif class_name in ("TFOpLambda", "SlicingOpLambda"):
        function = cfg.get("function")
        if function not in TF_FUNCTIONS:
            raise WeightsError(
                f"--model file {path} was saved by Keras 2 and holds layer {name!r}, the TensorFlow "
                f"function tf.{function} called on a Keras tensor, which is not one this builder "
                f"maps to Keras 3 (tf.concat, tf.reshape, x + y, x[:, -1], ...): use a Keras "
                f"layer for it, or {SAVED_MODEL_HINT}"
            )
        layer.update(module="export.keras2", class_name="TFOpLambda",
                     registered_name=f"{_PACKAGE}>TFOpLambda")
        layer["config"] = {"name": name, "trainable": cfg.get("trainable", True),
                           "dtype": cfg.get("dtype", "float32"), "function": function}
    elif class_name == "BatchNormalization" and isinstance(cfg.get("axis"), list) \
            and len(cfg["axis"]) == 1:
        cfg["axis"] = cfg["axis"][0]  # Keras 2 writes [2]; Keras 3 takes one int
    for key in ("layer", "backward_layer", "cell"):  # wrappers: Bidirectional, TimeDistributed
        if isinstance(cfg.get(key), dict) and "class_name" in cfg[key]:
            _translate_layer(cfg[key], heads, path, found)
    for key in ("batch_input_shape",) if class_name != "InputLayer" else ():
        cfg.pop(key, None)
    cfg.pop("time_major", None)  # Keras 2 RNNs; Keras 3 always takes batch-major sequences
    _drop_inert_keys(class_name, cfg)


# Keras 2 config values that change nothing at inference, by key: dropped where the Keras 3
# layer does not take the key (Conv1DTranspose's `groups`, SpatialDropout1D's `trainable`).
_INERT_VALUES = {"groups": 1, "trainable": True, "input_length": None, "noise_shape": None}
# Settings that only matter while training (the weights come from the file): SeparableConv1D
# in Keras 2 writes the plain convolution's kernel_* settings it never uses.
_TRAINING_ONLY = re.compile(r"_(initializer|regularizer|constraint)$")
# What keras.layers.Layer takes besides its named arguments.
_LAYER_KWARGS = {"input_dim", "input_shape", "batch_input_shape", "batch_size", "weights"}


def _accepted_keys(cls) -> set[str] | None:
    """The config keys the Keras 3 layer class takes: its `__init__` arguments and those of
    the classes its `**kwargs` reach, up to keras.layers.Layer. None when unknown."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if klass is keras.layers.Layer:
            return names | _LAYER_KWARGS
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def _drop_inert_keys(class_name: str, cfg: dict) -> None:
    cls = getattr(keras.layers, class_name, None)
    accepted = _accepted_keys(cls) if isinstance(cls, type) else None
    if accepted is None:
        return
    for key in [k for k in cfg if k not in accepted]:
        if _TRAINING_ONLY.search(key) or (key in _INERT_VALUES and cfg[key] == _INERT_VALUES[key]):
            del cfg[key]


def _as_xattn(layer: dict, name: str, heads: dict, path: str) -> None:
    cfg = layer["config"]
    if name not in heads:
        raise WeightsError(f"--model file {path}: fusionlab CrossAttention {name!r} has no weights "
                           "in the file (its query kernel gives the number of heads)")
    layer.update(module="xattn", class_name="CrossAttention", registered_name="xattn>CrossAttention")
    layer["config"] = {"name": name, "trainable": cfg.get("trainable", True),
                       "dtype": cfg.get("dtype", "float32"), "units": int(cfg["units"]),
                       "num_heads": int(heads[name])}


def _translate_multi_head_attention(layer: dict) -> None:
    """Keras 2 keeps the input shapes in the config; Keras 3 in the build config."""
    cfg = layer["config"]
    shapes = {k: cfg.pop(k) for k in ("query_shape", "key_shape", "value_shape") if k in cfg}
    if shapes.get("query_shape") is not None and shapes.get("value_shape") is not None:
        layer["build_config"] = {"shapes_dict": {k: v for k, v in shapes.items() if v is not None}}


def _is_entry(value) -> bool:
    return isinstance(value, list) and len(value) in (3, 4) and isinstance(value[0], str)


def _translate_node(node, keep_structure: bool = False):
    """A Keras 2 node as a Keras 3 node (`{"args": ..., "kwargs": ...}`).

    Keras 2 writes a node as its first argument's structure, each tensor an entry
    `[layer, node_index, tensor_index, kwargs]` (the call's keyword arguments ride on the
    entries; tensors among them are `[layer, node_index, tensor_index]`). A layer called on a
    one-tensor list gets the tensor, except TensorFlow functions (`keep_structure`), which
    Keras 2 called with the structure as it was.
    """
    if not isinstance(node, list):
        return node
    kwargs: dict = {}

    def walk(value):
        if _is_entry(value):
            if len(value) == 4 and value[3]:
                kwargs.update(value[3])
            return _tensor_ref(value[:3])
        return [walk(v) for v in value]

    first = walk(node)
    if isinstance(first, list) and len(first) == 1 and not keep_structure:
        first = first[0]
    kwargs.pop("name", None)  # TensorFlow functions' `name=None`: no meaning in Keras 3
    return {"args": [first], "kwargs": _refs_in(kwargs)}


def _tensor_ref(history) -> dict:
    # Shape and dtype are placeholders: Keras 3 replaces the tensor with the layer's output.
    return {"class_name": _TENSOR_REF,
            "config": {"shape": [], "dtype": "float32", "keras_history": list(history)}}


def _refs_in(value):
    if isinstance(value, dict):
        return {k: _refs_in(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) == 3 and isinstance(value[0], str) and all(isinstance(i, int) for i in value[1:]):
            return _tensor_ref(value)
        return [_refs_in(v) for v in value]
    return value


# -- TensorFlow functions called on Keras 2 tensors ---------------------------------------------

_PACKAGE = "xattn_keras2"


def _slice(item):
    """One element of a Keras 2 `slice_spec` (a dict for a slice, an int, None for tf.newaxis)."""
    if isinstance(item, dict) and set(item) == {"start", "stop", "step"}:
        return slice(item["start"], item["stop"], item["step"])
    if isinstance(item, dict) and item.get("class_name") == "__ellipsis__":
        return Ellipsis
    return item


def _unary(fn):
    return lambda x, name=None: fn(x)


def _binary(fn):
    return lambda x, y, name=None: fn(x, y)


def _reduce(fn):
    return lambda input_tensor, axis=None, keepdims=False, name=None: fn(input_tensor, axis=axis,
                                                                         keepdims=keepdims)


# The TensorFlow functions a Keras 2 model may call on its tensors that are mapped, by the name
# Keras 2 saves (`tf.` dropped), to keras.ops with TensorFlow's argument names. Nothing else is:
# the file names a function, it never supplies code.
TF_FUNCTIONS = {
    "__operators__.add": _binary(keras.ops.add),
    "math.add": _binary(keras.ops.add),
    "math.subtract": _binary(keras.ops.subtract),
    "math.multiply": _binary(keras.ops.multiply),
    "math.truediv": _binary(keras.ops.true_divide),
    "math.divide": _binary(keras.ops.divide),
    "math.maximum": _binary(keras.ops.maximum),
    "math.minimum": _binary(keras.ops.minimum),
    "math.pow": _binary(keras.ops.power),
    "math.negative": _unary(keras.ops.negative),
    "math.abs": _unary(keras.ops.abs),
    "math.exp": _unary(keras.ops.exp),
    "math.log": _unary(keras.ops.log),
    "math.sqrt": _unary(keras.ops.sqrt),
    "math.square": _unary(keras.ops.square),
    "math.tanh": _unary(keras.ops.tanh),
    "nn.tanh": _unary(keras.ops.tanh),
    "math.sigmoid": _unary(keras.ops.sigmoid),
    "nn.sigmoid": _unary(keras.ops.sigmoid),
    "nn.relu": _unary(keras.ops.relu),
    "nn.softmax": lambda logits, axis=None, name=None: keras.ops.softmax(
        logits, axis=-1 if axis is None else axis),
    "math.reduce_mean": _reduce(keras.ops.mean),
    "math.reduce_sum": _reduce(keras.ops.sum),
    "math.reduce_max": _reduce(keras.ops.max),
    "math.reduce_min": _reduce(keras.ops.min),
    "concat": lambda values, axis, name=None: keras.ops.concatenate(values, axis=axis),
    "stack": lambda values, axis=0, name=None: keras.ops.stack(values, axis=axis),
    "expand_dims": lambda input, axis, name=None: keras.ops.expand_dims(input, axis),
    "reshape": lambda tensor, shape, name=None: keras.ops.reshape(tensor, shape),
    "compat.v1.squeeze": lambda input, axis=None, name=None, squeeze_dims=None:
        keras.ops.squeeze(input, axis=axis if axis is not None else squeeze_dims),
    "squeeze": lambda input, axis=None, name=None: keras.ops.squeeze(input, axis=axis),
    "compat.v1.transpose": lambda a, perm=None, name=None, conjugate=False:
        keras.ops.transpose(a, perm),
    "transpose": lambda a, perm=None, conjugate=False, name=None: keras.ops.transpose(a, perm),
    "linalg.matmul": lambda a, b, transpose_a=False, transpose_b=False, name=None:
        keras.ops.matmul(keras.ops.swapaxes(a, -1, -2) if transpose_a else a,
                         keras.ops.swapaxes(b, -1, -2) if transpose_b else b),
    "__operators__.getitem": lambda x, slice_spec, var=None:
        x[tuple(_slice(item) for item in slice_spec)],
}
TF_FUNCTIONS["matmul"] = TF_FUNCTIONS["linalg.matmul"]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TFOpLambda(keras.layers.Layer):
    """A TensorFlow function a Keras 2 model called on a Keras tensor (Keras 2's `TFOpLambda`
    and `SlicingOpLambda` layers), run with keras.ops.

    Args:
        function: its name as Keras 2 saved it (`concat`, `math.multiply`,
            `__operators__.getitem`); one of `TF_FUNCTIONS`.
    """

    def __init__(self, function, **kwargs):
        super().__init__(**kwargs)
        if function not in TF_FUNCTIONS:
            raise ValueError(f"`function` must be one of the mapped TensorFlow functions. "
                             f"Received: function={function!r}")
        self.function = function

    def call(self, x, **kwargs):
        return TF_FUNCTIONS[self.function](x, **kwargs)

    def get_config(self):
        return {**super().get_config(), "function": self.function}


# -- reading the file --------------------------------------------------------------------------


def _read_keras_archive(path: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def _read_h5(path: str) -> dict:
    with h5py.File(path, "r") as f:
        text = f.attrs["model_config"]
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)


def _fusionlab_names(config: dict) -> list[str]:
    """fusionlab CrossAttention layer names, in the order the file's layers list them."""
    names = []

    def walk(model):
        for layer in model.get("config", {}).get("layers", []):
            texts = (str(layer.get("class_name", "")), layer.get("registered_name") or "",
                     f"{layer.get('module') or ''}.{layer.get('class_name', '')}")
            if any(_FUSIONLAB_CROSS_ATTENTION.match(t) for t in texts):
                names.append(layer.get("config", {}).get("name", layer.get("name")))
            elif "layers" in layer.get("config", {}):
                walk(layer)

    walk(config)
    return names


def _heads_in_archive(path: str, names: list[str]) -> dict[str, int]:
    """Heads of each fusionlab CrossAttention in a Keras 2 `.keras` archive.

    Its weights are stored by the position of each layer among those of its class
    (`layers/cross_attention_1/...`), not by the layer's name.
    """
    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as raw, \
            h5py.File(raw, "r") as f:
        out = {}
        for i, name in enumerate(names):
            key = "cross_attention" if i == 0 else f"cross_attention_{i}"
            dataset = f.get(f"layers/{key}/cross_attention/_query_dense/vars/0")
            if dataset is not None and len(dataset.shape) == 3:
                out[name] = int(dataset.shape[1])
        return out


def _heads_in_h5(path: str, names: list[str]) -> dict[str, int]:
    out = {}
    with h5py.File(path, "r") as f:
        weights = f.get("model_weights")
        for name in names:
            group = weights.get(name) if weights is not None else None
            if group is None:
                continue
            for weight in group.attrs.get("weight_names", []):
                weight = weight.decode() if isinstance(weight, bytes) else str(weight)
                if weight.endswith("/query/kernel:0") and len(group[weight].shape) == 3:
                    out[name] = int(group[weight].shape[1])
    return out


def load_keras2_model(path: str, file_format: str, version: str) -> tuple[keras.Model, Keras2File]:
    """The Keras 2 model file at `path` as a Keras 3 model (safe_mode on), and what it was."""
    raw = _read_keras_archive(path) if file_format == "keras" else _read_h5(path)
    names = _fusionlab_names(raw)
    heads = (_heads_in_archive if file_format == "keras" else _heads_in_h5)(path, names)
    config, found = translate_config(raw, heads, path)
    with _quiet():
        model = keras.saving.deserialize_keras_object(
            config, custom_objects={"xattn>CrossAttention": CrossAttention,
                                    f"{_PACKAGE}>TFOpLambda": TFOpLambda}, safe_mode=True)
        if file_format == "keras":
            _load_archive_weights(model, path)
        else:
            model.load_weights(path)
    return model, Keras2File(path=path, keras_version=version, format=file_format,
                             fusionlab_layers=found)


def _load_archive_weights(model: keras.Model, path: str) -> None:
    """The weights of a Keras 2 `.keras` archive: the same layout Keras 3 reads."""
    folder = tempfile.mkdtemp(prefix="xattn-keras2-")
    try:
        weights = os.path.join(folder, "model.weights.h5")
        with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as src, \
                open(weights, "wb") as dst:
            shutil.copyfileobj(src, dst)
        model.load_weights(weights)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    # Keras warns about the optimizer variables a training file holds and the model does not.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
