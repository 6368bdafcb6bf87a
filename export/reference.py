"""The Keras reference: a `keras.Model` holding one CrossAttention, its weights, seeded inputs.

Weights come from a seed (every weight random and non-zero, biases included: Keras starts biases
at zero, which would let a dropped bias pass any parity test) or from a user's `.keras` /
`.weights.h5` file, loaded with Keras' `safe_mode` on.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass

import h5py
import keras
import numpy as np

from export.errors import ExportError, WeightsError, first_line
from export.graph import (
    NO_GRAPH_OPTIONS,
    GraphOptions,
    build_inference_function,
    fold_weights,
    preferred_layout,
)
from export.spec import ArtifactSpec, bucket_key
from xattn import CrossAttention

GOLDEN_SEED = 20240601
# What a weight holds until a .weights.h5 file fills it: a float32 no trained weight equals.
_UNLOADED = np.float32(-3.0e38)
VERIFY_SEED = 1000


@dataclass(frozen=True)
class FileWeights:
    """What a `.keras` file says about its CrossAttention."""

    path: str
    units: int
    heads: int
    query_features: int
    kv_features: int
    weights: list


def random_weights(spec: ArtifactSpec, seed: int) -> list[np.ndarray]:
    """Seeded weights in fusionlab order; every entry non-zero, scaled to keep activations O(1)."""
    rng = np.random.default_rng(seed)
    u, h = spec.units, spec.heads

    def kernel(shape, fan_in):
        return rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=shape)

    def bias(shape):
        # Bounded away from zero so a lost bias always shows.
        return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.05, 0.5, size=shape)

    arrays = [
        kernel((spec.query_features, u), spec.query_features), bias((u,)),
        kernel((spec.kv_features, u), spec.kv_features), bias((u,)),
        kernel((u, h, u), u), bias((h, u)),
        kernel((u, h, u), u), bias((h, u)),
        kernel((u, h, u), u), bias((h, u)),
        kernel((h, u, u), h * u), bias((u,)),
    ]
    return [a.astype(np.float32) for a in arrays]


def build_reference(spec: ArtifactSpec, weights: list[np.ndarray]):
    """A `keras.Model` with inputs named as the artifact's and a dict of named outputs."""
    # Several lengths (buckets, or a symbolic axis): the reference runs at every one of them.
    tq, tkv = (None, None) if spec.lengths else (spec.query_len, spec.kv_len)
    inputs = {
        "source1": keras.Input((tq, spec.query_features), name="source1"),
        "source2": keras.Input((tkv, spec.kv_features), name="source2"),
    }
    if spec.query_mask:
        inputs["query_mask"] = keras.Input((tq,), dtype="bool", name="query_mask")
    if spec.value_mask:
        inputs["value_mask"] = keras.Input((tkv,), dtype="bool", name="value_mask")
    layer = CrossAttention(spec.units, spec.heads, name="cross_attention")
    result = layer(
        [inputs["source1"], inputs["source2"]],
        query_mask=inputs.get("query_mask"),
        value_mask=inputs.get("value_mask"),
        use_causal_mask=spec.causal,
        return_attention_scores=spec.scores,
    )
    outputs = {"output": result[0], "attention_scores": result[1]} if spec.scores else {
        "output": result
    }
    model = keras.Model(inputs=inputs, outputs=outputs, name=spec.name)
    try:
        layer.set_weights(weights)
    except ValueError as e:
        raise WeightsError(f"weights do not fit {spec.describe()}: {e}") from e
    return model


def nominal_spec(spec: ArtifactSpec, length: int = 64) -> ArtifactSpec:
    """`spec` with every symbolic length set to `length`: what a layout choice is made for."""
    if not spec.dynamic_lengths:
        return spec
    return spec.replace(query_len=spec.query_len or length, kv_len=spec.kv_len or length,
                        name=spec.name)


def reference_weights(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in find_cross_attention(model).get_weights()]


def run_reference(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        # Length 1 (a dynamic-length file is verified there): Keras warns that a softmax over
        # one key is always 1, which is exactly what attention over one key is.
        warnings.filterwarnings("ignore", message="You are using a softmax over axis")
        outputs = model(dict(feeds), training=False)
    return {k: np.asarray(v) for k, v in outputs.items()}


def make_inputs(spec: ArtifactSpec, rows: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded standard-normal sources and random masks with >= 1 real position per row."""
    rng = np.random.default_rng(seed)
    spec = nominal_spec(spec)  # symbolic lengths: rows at a nominal length
    feeds = {
        "source1": rng.standard_normal((rows, spec.query_len, spec.query_features), dtype=np.float32),
        "source2": rng.standard_normal((rows, spec.kv_len, spec.kv_features), dtype=np.float32),
    }
    if spec.query_mask:
        feeds["query_mask"] = _random_mask(rng, rows, spec.query_len)
    if spec.value_mask:
        feeds["value_mask"] = _random_mask(rng, rows, spec.kv_len)
    return feeds


def _random_mask(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """Padding-style masks: each row keeps a prefix of 1..length real positions."""
    lengths = rng.integers(1, length + 1, size=rows)
    return np.arange(length)[None, :] < lengths[:, None]


class LayerReference:
    """The lone layer as the reference: a `keras.Model` around one CrossAttention.

    The same interface as `export.model.ModelReference` (the user's whole model), so the
    pipeline treats both alike: inputs, runs, the inference function, the manifest's facts.
    """

    kind = "layer"

    def __init__(self, spec: ArtifactSpec, weights: list[np.ndarray], source: str):
        self.model = build_reference(spec, weights)
        self.source = source
        self.folded = fold_weights(reference_weights(self.model), spec.heads)
        self.layer_config = find_cross_attention(self.model).get_config()
        self._describe = (f"CrossAttention({spec.units}, {spec.heads}), "
                          f"{spec.describe().split(' batch=')[0]}, weights from {source}")

    def describe(self) -> str:
        return self._describe

    def save(self, path: str) -> None:
        self.model.save(path)

    def make_inputs(self, spec: ArtifactSpec, rows: int, seed: int) -> dict[str, np.ndarray]:
        return make_inputs(spec, rows, seed)

    def run(self, spec: ArtifactSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_reference(self.model, feeds)

    def inference_function(self, spec: ArtifactSpec, *, fallback_layout: str,
                           options: GraphOptions = NO_GRAPH_OPTIONS):
        """`(fn, layout)`: the folded graph of the spec and the head layout it uses.

        A bucketed spec gives `{signature key: fn}` (export.buckets), every bucket in one layout
        (the largest's) so that every trace creates the same weight constants.
        """
        layout = preferred_layout(nominal_spec(spec), fallback_layout)
        if spec.lengths:
            fns = {}
            for q, kv in spec.lengths:
                at = spec.replace(lengths=(), query_len=q, kv_len=kv, name=spec.name)
                fns[bucket_key(q, kv)] = build_inference_function(
                    at, self.folded, layout=layout, **options.keywords())
            fns["serving_default"] = fns[bucket_key(spec.query_len, spec.kv_len)]
            return fns, layout
        fn = build_inference_function(spec, self.folded, layout=layout, **options.keywords())
        return fn, layout

    def manifest_facts(self, spec: ArtifactSpec) -> dict:
        shapes = {
            "batch": spec.batch, "query_len": spec.query_len, "kv_len": spec.kv_len,
            "query_features": spec.query_features, "kv_features": spec.kv_features,
        }
        if spec.lengths:
            shapes["lengths"] = [list(p) for p in spec.lengths]
        return {
            "config": self.layer_config,
            "shapes": shapes,
            "masks": {"query_mask": spec.query_mask, "value_mask": spec.value_mask,
                      "causal": spec.causal, "scores": spec.scores},
        }

    def explain(self, error: ExportError) -> ExportError:
        """The layer's graph is ours: a converter's failure is reported as it is."""
        return error

    def scale_tolerance(self, tolerance: dict, outputs: dict[str, np.ndarray]) -> dict:
        """The layer's outputs are O(1): its gates are absolute, as given."""
        return tolerance


# -- loading a user's weights -------------------------------------------------------------------


def find_cross_attention(obj):
    """The first CrossAttention in `obj` (itself, or depth-first through its sublayers)."""
    if isinstance(obj, CrossAttention):
        return obj
    for layer in getattr(obj, "_flatten_layers", lambda **_: [])(include_self=False, recursive=True):
        if isinstance(layer, CrossAttention):
            return layer
    return None


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise WeightsError(f"--weights file not found: {path}")
    if os.path.isdir(path):
        raise WeightsError(f"--weights must be a file, got a folder: {path}")
    if not os.path.isfile(path):
        # A FIFO, socket or device: reading it could block forever or never end.
        raise WeightsError(f"--weights must be a regular file, got {_file_kind(path)}: {path}")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise WeightsError(f"--weights file {path} cannot be read: {e.strerror or e}") from e


def _file_kind(path: str) -> str:
    import stat  # lazy: only for this rare message

    mode = os.stat(path).st_mode
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


def check_finite(weights: list[np.ndarray], path: str) -> None:
    """NaN/inf weights would pass through every converter and fail only as NaN outputs: say so."""
    for index, array in enumerate(weights):
        array = np.asarray(array)
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise WeightsError(
                f"--weights file {path} holds {bad} NaN/inf value(s) in weight {index} of shape "
                f"{tuple(array.shape)}; a model with them cannot be verified"
            )


def load_keras_file(path: str) -> FileWeights:
    """Load a `.keras` file with safe_mode on and read its first CrossAttention."""
    _check_readable(path)
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"--weights file {path} is not a .keras archive (not a zip file)")
    try:
        obj = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types; the user needs the file and the reason.
        reason = first_line(e)
        if "lambda" in str(e).lower() and "safe_mode" in str(e).lower():
            reason = "it holds a Lambda layer (arbitrary code), refused with safe_mode on"
        raise WeightsError(f"--weights file {path} could not be loaded safely: {reason}") from e
    layer = find_cross_attention(obj)
    if layer is None:
        raise WeightsError(f"--weights file {path} holds no xattn CrossAttention layer")
    if not layer.built:
        raise WeightsError(f"--weights file {path}: its CrossAttention was never built (no weights)")
    weights = [np.asarray(w) for w in layer.get_weights()]
    if not layer.use_bias:
        weights = _with_zero_biases(weights, layer.units, layer.num_heads)
    check_finite(weights, path)
    return FileWeights(
        path=path,
        units=layer.units,
        heads=layer.num_heads,
        query_features=int(weights[0].shape[0]),
        kv_features=int(weights[2].shape[0]),
        weights=weights,
    )


def _with_zero_biases(weights: list, units: int, heads: int) -> list:
    s1, s2, q, k, v, o = weights
    z = np.zeros
    return [s1, z(units), s2, z(units), q, z((heads, units)), k, z((heads, units)),
            v, z((heads, units)), o, z(units)]


def load_h5_weights(path: str, spec: ArtifactSpec) -> list[np.ndarray]:
    """Weights from `model.save_weights(...)` of a model built like the reference."""
    _check_readable(path)
    if not h5py.is_hdf5(path):
        raise WeightsError(f"--weights file {path} is not an HDF5 file (from model.save_weights)")
    # Sentinel placeholders: no real weight equals them (seeded ones could, e.g. those of seed 0;
    # NaN could not tell a weight left unloaded from a NaN in the file).
    placeholder = [np.full(w.shape, _UNLOADED, np.float32) for w in random_weights(spec, 0)]
    model = build_reference(spec.replace(query_mask=False, value_mask=False, causal=False,
                                         scores=False), placeholder)
    shapes = spec.describe().split(" batch=")[0]
    try:
        model.load_weights(path)
    except Exception as e:
        reason = _h5_shape_mismatch(path, placeholder)
        if reason is None:
            reason = first_line(e)
        raise WeightsError(
            f"--weights file {path} does not fit a CrossAttention with {shapes}: {reason}"
        ) from e
    loaded = reference_weights(model)
    # Keras skips (with a warning) variables it cannot find; never export placeholders.
    unchanged = [i for i, w in enumerate(loaded) if np.all(w == _UNLOADED)]
    if unchanged:
        raise WeightsError(
            f"--weights file {path} does not hold the weights of a model built like the reference "
            f"(inputs source1, source2 into one CrossAttention named 'cross_attention'); "
            f"{len(unchanged)} of 12 weights were not found in it"
        )
    check_finite(loaded, path)
    return loaded


def _h5_shape_mismatch(path: str, expected: list[np.ndarray]) -> str | None:
    """The array shapes a weights file holds that the configuration has no place for, and back.

    Keras' own message for this names an inner layer and "0 variables received"; the shapes
    tell a user which flag (units, heads, features) to change.
    """
    found: list[tuple] = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda _, obj: found.append(tuple(obj.shape)) if isinstance(obj, h5py.Dataset) else None
            )
    except Exception:  # unreadable: the caller keeps Keras' reason
        return None
    # Counted, not as sets: a (64, 64) the file holds once where two are needed is missing once.
    needed = [tuple(w.shape) for w in expected]
    extra = sorted((Counter(found) - Counter(needed)).elements())
    missing = sorted((Counter(needed) - Counter(found)).elements())
    if not extra and not missing:
        return None
    def shapes(found_or_missing):
        return ", ".join(str(s) for s in found_or_missing)

    if not missing:
        return f"it holds arrays of shapes {shapes(extra)} that this configuration has no place for"
    if not extra:
        return f"it lacks arrays of shapes {shapes(missing)} that this configuration needs"
    return f"it holds arrays of shapes {shapes(extra)} where this configuration needs {shapes(missing)}"
