"""Loading a user's model (`--model PATH.keras`, `--import`, `--input-shape`, `--sample-inputs`):
the file with Keras' `safe_mode` on, its inputs' and outputs' names and static shapes, and the
sample inputs read without unpickling. Every failure is one typed line.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import zipfile

import keras
import numpy as np

from export import keras2
from export.errors import ExportError, SpecError, WeightsError, first_line, one_line
from export.names import is_valid_name
from export.spec import TensorInfo

# Dtypes a model input may have in an artifact, by what Keras reports.
_INPUT_DTYPES = {"float32": "float32", "bool": "bool", "int32": "int32", "int64": "int64"}


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


# The model files --model reads: Keras 3 or Keras 2 archives, and legacy HDF5 model files.
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def load_model(path: str) -> keras.Model:
    """The user's model, loaded with safe_mode on. WeightsError (exit 3) when it cannot be."""
    return load_model_file(path)[0]


def load_model_file(path: str):
    """`(model, origin)`: the user's model (safe_mode on) and, for a file saved by Keras 2, what
    it was (`export.keras2.Keras2File`; None for a Keras 3 file). WeightsError (exit 3)."""
    if not os.path.exists(path):
        raise WeightsError(f"--model file not found: {path}")
    if not os.path.isfile(path):
        raise WeightsError(f"--model must be a .keras or .h5 model file, got a folder: {path}")
    if not path.endswith(MODEL_SUFFIXES):
        raise WeightsError("--model must be a .keras archive or a .h5 model file (model.save(...)). "
                           f"Received: {path}")
    found = keras2.keras_version(path)
    if found is None:
        if path.endswith(".keras") or zipfile.is_zipfile(path):
            raise WeightsError(f"--model must be a .keras archive (model.save('x.keras')). Received: {path}")
        raise WeightsError(f"--model file {path} is not a Keras model file: a .h5 file from "
                           "model.save('x.h5') holds a model config (weights alone, from "
                           "save_weights, go to --weights)")
    file_format, version = found
    origin = None
    try:
        if keras2.is_keras2(version):
            model, origin = keras2.load_keras2_model(path, file_format, version)
        else:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except ExportError:
        raise
    except Exception as e:  # Keras raises many types; the user needs the file and the reason.
        text = str(e)
        reason = load_failure_reason(e)
        if "lambda" in text.lower() and "safe_mode" in text.lower():
            reason = ("it holds a Lambda layer (arbitrary Python code), refused with safe_mode on; "
                      "replace it with a registered layer and pass its module with --import")
        elif "Could not locate" in text or "Unknown layer" in text or "unknown" in text.lower():
            reason += " (a custom layer? pass the module that registers it with --import)"
        saved_by = f" (saved by Keras {version})" if keras2.is_keras2(version) else ""
        raise WeightsError(f"--model file {path}{saved_by} could not be loaded safely: {reason}") from e
    if not isinstance(model, keras.Model):
        raise WeightsError(f"--model file {path} holds a {type(model).__name__}, not a keras.Model")
    return model, origin


def load_failure_reason(error: BaseException) -> str:
    """Keras' reason for a file it could not load, on one line, without the config or the
    arrays it dumps, and not cut before the cause.

    Keras wraps the cause (`... could not be deserialized properly ... Exception encountered:
    <cause>`), appends whole configs (`Full object config: {...}`) and, for weights that do not
    fit, prints the variable's values after the two shapes that say what is wrong.
    """
    text = str(error)
    total = re.search(r"A total of (\d+) objects could not be loaded", text)
    if total:
        names = re.findall(r"<\w+ name=([^,>\s]+)", text.split("List of objects", 1)[-1])
        which = f" ({', '.join(dict.fromkeys(names))})" if names else ""
        shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
        if shapes:
            variable = re.search(r"<Variable path=([^,>\s]+)", text)
            cause = (f"{'variable ' + variable.group(1) if variable else 'a variable'}: the file "
                     f"holds shape {shapes.group(2)} where the model has {shapes.group(1)}")
        else:
            example = re.search(r"Example error message for object[^:]*:\s*(.+?)(?:\n\s*\n|$)", text,
                                re.S)
            cause = one_line(example.group(1)) if example else ""
        return (f"{total.group(1)} objects do not fit the model's weights{which}"
                + (f"; the first: {cause}" if cause else ""))
    if "Exception encountered:" in text:
        text = text.rsplit("Exception encountered:", 1)[1]
    text = re.split(r"\s*(?:Full object config:|config=\{|Target variable:)", text)[0]
    return one_line(text) or type(error).__name__


def functional_view(model: keras.Model, input_shapes: dict[str, tuple[int, ...]]) -> keras.Model:
    """A subclassed model (no symbolic inputs) as a functional model calling it, traced through
    its `call`; a functional or Sequential model as it is.

    The inputs are named and shaped by `--input-shape NAME=D1,...` (in the order given: one is
    passed as a tensor, several as a list), else by the model's build config (`input`, or
    `input_0`, `input_1` ... for a list).
    """
    if getattr(model, "inputs", None):
        return model
    if input_shapes:
        shapes = dict(input_shapes)
    else:
        built = (getattr(model, "_build_shapes_dict", None) or {})
        found = next(iter(built.values()), None) if len(built) == 1 else None
        if found is None or (isinstance(found, (list, tuple)) and found
                             and not isinstance(found[0], (list, tuple, type(None), int))):
            raise SpecError(
                f"model {model.name!r} is a subclassed {type(model).__name__} without symbolic "
                "inputs or a build config: give each input's shape (without the batch) with "
                "--input-shape NAME=D1,D2,... in the order its call takes them")
        several = isinstance(found, (list, tuple)) and found and isinstance(found[0], (list, tuple))
        listed = [tuple(s) for s in found] if several else [tuple(found)]
        names = [f"input_{i}" for i in range(len(listed))] if several else ["input"]
        shapes = {}
        for name, shape in zip(names, listed):
            if any(d is None for d in shape[1:]):
                raise SpecError(
                    f"model {model.name!r} was built with input shape {_shape_text(shape)}: fix its "
                    f"unknown axes with --input-shape {name}="
                    + ",".join("D" if d is None else str(d) for d in shape[1:]))
            shapes[name] = tuple(shape[1:])
    inputs = [keras.Input(shape, name=name) for name, shape in shapes.items()]
    try:
        outputs = model(inputs[0] if len(inputs) == 1 else inputs)
        view = keras.Model(inputs, outputs, name=model.name)
    except Exception as e:  # noqa: BLE001 - the user's call on these shapes: one line
        given = ", ".join(f"{n}={','.join(map(str, s))}" for n, s in shapes.items())
        raise SpecError(f"model {model.name!r} ({type(model).__name__}) cannot be called on "
                        f"inputs {given}: {type(e).__name__}: {first_line(e)}") from e
    return view


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
    # A Sequential model has no `output_names` in Keras 3: its outputs' layers name them.
    names = list(getattr(model, "output_names", None)
                 or [t._keras_history[0].name for t in model.outputs])
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
        out[t.name] = _cast_exactly(array, t, label)
        rows.add(array.shape[0])
    if len(rows) != 1 or 0 in rows:
        raise SpecError(f"{label}: arrays disagree on the number of rows (or have none): {sorted(rows)}")
    return out


def _cast_exactly(array: np.ndarray, t: TensorInfo, label: str) -> np.ndarray:
    """`array` as the input's dtype, or SpecError naming a value that does not fit it (int64 ids
    of 2**40 wrapped to 0 in int32; float64 1e39 became inf in float32)."""
    target = np.dtype(t.dtype)
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        outside = (array < info.min) | (array > info.max)
        if outside.any():
            value = array[outside].flat[0]
            raise SpecError(f"{label}: {t.name} holds {value}, which does not fit the model "
                            f"input's {t.dtype} ({info.min}..{info.max})")
    with np.errstate(over="ignore"):  # an overflow is found just below and named
        cast = array.astype(target)
    if target.kind == "f" and not np.isfinite(cast).all():
        value = array[~np.isfinite(cast)].flat[0]
        raise SpecError(f"{label}: {t.name} holds {value}, which does not fit the model input's "
                        f"{t.dtype} (it would become inf)")
    return cast


def _embedding_feeds(model: keras.Model):
    """(input name, Embedding) for every Embedding that a model input feeds directly."""
    by_tensor = {id(t): t.name for t in model.inputs}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if not isinstance(layer, keras.layers.Embedding):
            continue
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                name = by_tensor.get(id(tensor))
                if name is not None:
                    yield name, layer


def with_embedding_ranges(model: keras.Model, inputs: tuple[TensorInfo, ...]
                          ) -> tuple[TensorInfo, ...]:
    """`inputs`, each integer input that feeds an Embedding carrying the ids it takes,
    `range` = (0, input_dim) (the smallest input_dim when it feeds several): the manifest records
    it and the server refuses ids outside it (onnxruntime wrapped -1 to the last row)."""
    highs: dict[str, int] = {}
    for name, layer in _embedding_feeds(model):
        highs[name] = min(highs.get(name, layer.input_dim), int(layer.input_dim))
    return tuple(
        dataclasses.replace(t, range=(0, highs[t.name]))
        if t.name in highs and np.dtype(t.dtype).kind in "iu" else t
        for t in inputs
    )


def check_embedding_ranges(model: keras.Model, samples: dict[str, np.ndarray], path: str) -> None:
    """SpecError naming the input, the value and the layer when ids fed straight into an
    `Embedding` fall outside [0, input_dim): TensorFlow's own error was a page, exit 1."""
    for name, layer in _embedding_feeds(model):
        if name not in samples:
            continue
        ids = samples[name]
        outside = (ids < 0) | (ids >= layer.input_dim)
        if outside.any():
            raise SpecError(
                f"--sample-inputs file {path}: {name} holds {ids[outside].flat[0]}, "
                f"outside [0, {layer.input_dim}) of Embedding {layer.name!r}")


def default_stem(path: str) -> str:
    """An artifact base name from the model file's name (letters, digits, _ - .)."""
    base = os.path.basename(path)
    base = next((base[: -len(s)] for s in MODEL_SUFFIXES if base.endswith(s)), base)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-")
    stem = stem or "model"
    return stem if is_valid_name(stem) else "model"
