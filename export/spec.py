"""ArtifactSpec: one artifact's shapes, batch, masks and variant, and the names derived from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from export.errors import SpecError
from export.formats import get_format
from export.names import check_name

if TYPE_CHECKING:  # names in ExportRequest's annotations only: export.model imports Keras
    from export.model import ModelReference, ModelSpec

QUANTIZE_MODES = ("none", "float16", "dynamic-int8", "int8", "int8-cpu")
VARIANT_SUFFIX = {"none": "", "float16": "_fp16", "dynamic-int8": "_dynint8", "int8": "_int8",
                  "int8-cpu": "_int8cpu"}
# Variants that quantize activations with calibrated ranges (where a format's int8 is
# full-integer): int8 everywhere, int8-cpu everywhere but the attention core (export.tflite.quantize).
CALIBRATED_MODES = ("int8", "int8-cpu")
# The TFLite ops int8-cpu keeps in float32 (where their operands are all computed at run time):
# XNNPACK (LiteRT's CPU delegate) has no int8 kernel for a BATCH_MATMUL of two run-time operands
# nor for SOFTMAX, so in int8 the attention core falls back to the builtin kernels (2.5x the
# float32 file's time at batch 1). SOFTMAX too, measured with `python -m export.bench --lengths
# 10,64,256 --variants none,int8-cpu` (docs/variants.md): with BATCH_MATMUL alone in float the
# int8 SOFTMAX made the file 1.4-2x float32's time from length 64 on (0.70x at length 10).
# Since the late softmax (export.graph) the ops between the two BATCH_MATMULs and up to its division
# stay float32 too: a graph walk (export.tflite.quantize.attention_core_nodes), not these types.
CPU_FLOAT_OPS = ("BATCH_MATMUL", "SOFTMAX")


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of an artifact: name, shape (None for a dynamic axis), dtype, and for
    integer ids that feed an Embedding the values it takes, `range` = (low, high): [low, high)."""

    name: str
    shape: tuple
    dtype: str
    range: tuple[int, int] | None = None

    def as_json(self) -> dict:
        entry = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.range is not None:
            entry["range"] = [int(self.range[0]), int(self.range[1])]
        return entry


class ArtifactNames:
    """File names derived from a spec's `name`, `quantize`, `int8_io` and `batch`: shared by
    ArtifactSpec (the lone layer) and export.model.ModelSpec (a whole model)."""

    # A user's own graph (`--saved-model`'s SavedModelSpec): the graph checks let it loop and
    # read shapes. The layer's and a `--model`'s graphs are ours, and never do.
    user_graph = False

    @property
    def variant_suffix(self) -> str:
        return VARIANT_SUFFIX[self.quantize] + ("io" if self.int8_io else "")

    def artifact_name(self, fmt: str) -> str:
        """File (or folder, for SavedModel) name of this spec's artifact in format `fmt`."""
        return f"{self.name}{self.variant_suffix}{get_format(fmt).suffix}"

    def manifest_name(self, fmt: str) -> str:
        return f"{self.artifact_name(fmt)}.json"

    @property
    def reference_name(self) -> str:
        return f"{self.name}.keras"

    @property
    def golden_name(self) -> str:
        return f"{self.name}.golden.npz"

    @property
    def golden_samples(self) -> int:
        """Rows in the golden file: a multiple of any fixed batch that shares this name."""
        return 4 if self.batch in (None, 1) else 2 * self.batch


@dataclass(frozen=True)
class ArtifactSpec(ArtifactNames):
    """Everything that decides an artifact's graph and file names.

    `batch=None` means a dynamic batch axis (the only axis that may be dynamic).
    `name` is the base name shared by the reference `.keras`, the golden vectors and
    every format; the artifact's own file adds the variant suffix and extension.
    """

    units: int = 64
    heads: int = 4
    query_len: int | None = 10  # None: a symbolic length axis (`query_len`)
    kv_len: int | None = 10  # None: a symbolic length axis (`kv_len`)
    query_features: int = 64
    kv_features: int = 64
    batch: int | None = None
    query_mask: bool = False
    value_mask: bool = False
    causal: bool = False
    scores: bool = False
    quantize: str = "none"
    int8_io: bool = False
    # Length buckets ((Tq, Tkv), ...), ascending: one signature each (export.buckets). The
    # lengths above are then the largest bucket's, and both masks are inputs.
    lengths: tuple = ()
    name: str = field(default="")

    def __post_init__(self):
        if self.lengths:
            _check_buckets(self)
        for attr in ("units", "heads", "query_len", "kv_len", "query_features", "kv_features"):
            value = getattr(self, attr)
            if value is None and attr in ("query_len", "kv_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(f"`{attr}` must be a positive integer. Received: {attr}={value!r}")
        if self.batch is not None and (
            isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch <= 0
        ):
            raise SpecError(
                f"`batch` must be a positive integer or None (dynamic). Received: batch={self.batch!r}"
            )
        if self.quantize not in QUANTIZE_MODES:
            raise SpecError(
                f"`quantize` must be one of {', '.join(QUANTIZE_MODES)}. "
                f"Received: quantize={self.quantize!r}"
            )
        if self.int8_io and self.quantize != "int8":
            raise SpecError(
                f"`int8_io` needs quantize='int8'. Received: quantize={self.quantize!r}"
            )
        if not self.name:
            object.__setattr__(self, "name", self.default_name())
        else:
            check_name(self.name)

    def replace(self, **changes) -> ArtifactSpec:
        """A copy with some fields changed; a derived default name is derived again."""
        if self.name == self.default_name() and "name" not in changes:
            changes["name"] = ""
        return dataclasses.replace(self, **changes)

    def default_name(self) -> str:
        if self.lengths:
            # Both masks are implied by the buckets: no _qmask_vmask.
            name = (f"xattn_u{self.units}_h{self.heads}_len{buckets_text(self.lengths, '-')}"
                    f"_f{self.query_features}x{self.kv_features}")
            return name + ("" if self.batch in (None, 1) else f"_b{self.batch}") + (
                "_causal" if self.causal else "") + ("_scores" if self.scores else "")
        tq = "dyn" if self.query_len is None else self.query_len
        tkv = "dyn" if self.kv_len is None else self.kv_len
        name = (
            f"xattn_u{self.units}_h{self.heads}"
            f"_q{tq}x{self.query_features}_kv{tkv}x{self.kv_features}"
        )
        # Batch 1 and a dynamic batch share a name: both run the same golden vectors.
        if self.batch is not None and self.batch != 1:
            name += f"_b{self.batch}"
        for flag, suffix in (
            (self.query_mask, "_qmask"),
            (self.value_mask, "_vmask"),
            (self.causal, "_causal"),
            (self.scores, "_scores"),
        ):
            if flag:
                name += suffix
        return name

    # -- tensors -----------------------------------------------------------------------------

    def inputs(self) -> list[TensorInfo]:
        b = self.batch
        infos = [
            TensorInfo("source1", (b, self.query_len, self.query_features), "float32"),
            TensorInfo("source2", (b, self.kv_len, self.kv_features), "float32"),
        ]
        if self.query_mask:
            infos.append(TensorInfo("query_mask", (b, self.query_len), "bool"))
        if self.value_mask:
            infos.append(TensorInfo("value_mask", (b, self.kv_len), "bool"))
        return infos

    def outputs(self) -> list[TensorInfo]:
        b = self.batch
        infos = [TensorInfo("output", (b, self.query_len, self.units), "float32")]
        if self.scores:
            infos.append(
                TensorInfo("attention_scores", (b, self.heads, self.query_len, self.kv_len), "float32")
            )
        return infos

    def layer_config(self) -> dict:
        return {"units": self.units, "num_heads": self.heads}

    def describe(self) -> str:
        batch = "dynamic" if self.batch is None else self.batch
        extras = [n for n, on in (("query_mask", self.query_mask), ("value_mask", self.value_mask),
                                  ("causal", self.causal), ("scores", self.scores)) if on]
        text = (
            f"units={self.units} heads={self.heads} query={_length(self.query_len)}x"
            f"{self.query_features} kv={_length(self.kv_len)}x{self.kv_features} batch={batch}"
        )
        if extras:
            text += " " + " ".join(extras)
        if self.quantize != "none":
            text += f" quantize={self.quantize}" + (" int8-io" if self.int8_io else "")
        if self.lengths:
            text += f" lengths={buckets_text(self.lengths, ',')}"
        return text

    @property
    def dynamic_lengths(self) -> bool:
        """Whether a length axis is symbolic (`--query-len dynamic` / `--kv-len dynamic`)."""
        return self.query_len is None or self.kv_len is None


def _length(value: int | None) -> str:
    return "dynamic" if value is None else str(value)


def bucket_key(query_len: int, kv_len: int) -> str:
    """The signature key of a length bucket: `len_16` (Tq = Tkv) or `len_16x32`."""
    return f"len_{query_len}" if query_len == kv_len else f"len_{query_len}x{kv_len}"


def buckets_text(lengths, sep: str) -> str:
    """16,64,256 or 16x32,64x128: the buckets as `--lengths` spells them."""
    return sep.join(str(q) if q == kv else f"{q}x{kv}" for q, kv in lengths)


def _check_buckets(spec: ArtifactSpec) -> None:
    """Normalise `lengths` (sorted by work, no repeats), imply both masks, take the largest."""
    try:
        pairs = [(int(q), int(kv)) for q, kv in spec.lengths]
    except (TypeError, ValueError):
        raise SpecError(f"`lengths` must be pairs (Tq, Tkv). Received: lengths={spec.lengths!r}") from None
    if any(isinstance(v, bool) or v <= 0 for pair in pairs for v in pair):
        raise SpecError(f"`lengths` must be positive. Received: lengths={spec.lengths!r}")
    pairs = sorted(set(pairs), key=lambda p: (p[0] * p[1], p))
    largest = pairs[-1]
    object.__setattr__(spec, "lengths", tuple(pairs))
    object.__setattr__(spec, "query_len", largest[0])
    object.__setattr__(spec, "kv_len", largest[1])
    object.__setattr__(spec, "query_mask", True)
    object.__setattr__(spec, "value_mask", True)


@dataclass
class ExportRequest:
    """What to build, where, and from which weights.

    Attributes:
        specs: format name -> ArtifactSpec; formats may differ in batch and variant only.
        output_dir: where the artifacts are published.
        seed: seed of the random weights when `weights` is None.
        weights: the layer's 12 arrays in fusionlab order; None draws them from `seed`.
        weights_source: where `weights` came from (a file name), for the manifest.
        atol: the float32 gate; None takes each format's default (export.formats).
        max_rel_error: a variant's relative L2 gate; None takes the variant's default.
        opset: the ONNX opset; None the newest tf2onnx writes that onnxruntime runs.
        calibration: an .npz of calibration inputs for int8 variants; None draws them.
        model: a user's whole model (`--model`) instead of the lone layer; `specs` are then
            ModelSpecs and `seed`/`weights` do not apply. Its sample inputs (if any) supply the
            golden vectors and the int8 calibration.
        sign_key: an elliptic-curve private key (PEM); None publishes unsigned sets.
        arena_limit: TFLM files whose smallest tensor arena is larger fail (ArenaError).
        arm: run the staged files under aarch64 emulation (export.arm) and record, per CPU
            model, their max abs diff and whether they stay within their gate in the
            manifest's `deployment.arm`, before any manifest is written.
    """

    specs: dict[str, ArtifactSpec | ModelSpec]
    output_dir: str = "artifacts"
    seed: int = 0
    weights: list | None = None  # 12 arrays in fusionlab order; None -> random from `seed`
    weights_source: str | None = None  # a file path, for the manifest
    atol: float | None = None  # None -> check.DEFAULT_ATOL[format]
    max_rel_error: float | None = None  # None -> check.DEFAULT_MAX_REL[variant]
    opset: int | None = None
    calibration: str | None = None
    model: ModelReference | None = None
    sign_key: str | None = None  # a PEM EC private key: each set signed into <artifact>.sig
    arena_limit: int | None = None  # TFLM: the largest tensor arena allowed, in bytes
    arm: bool = False  # verify under aarch64 emulation before publishing: deployment.arm
