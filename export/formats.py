"""The format registry: one record per artifact format, looked up by name everywhere.

A record says what a format is (file suffix, default batch, tolerance, runtime, head layout) and
where its code lives (builder, graph check, runner). The code is named as "module:function" and
imported on first use: builders import TensorFlow, and `export.runtime.verify` reads this registry in a
process that must never import it. Adding a format is one record here plus its builder package
(and a runner, unless an existing one opens its files: ORT files open in the ONNX runner).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from export.errors import SpecError


@dataclass(frozen=True)
class Built:
    """What a builder hands back: the artifact's path and its format-specific manifest facts.

    `graph_source` is an ONNX file holding the artifact's graph, for reports that cannot parse the
    artifact itself (an `.ort` flatbuffer); it lies in the builder's scratch and is not published.
    """

    path: str
    facts: dict = field(default_factory=dict)
    graph_source: str | None = None
    # Files the builder wrote beside the artifact (TFLM's generated C++), published in its set:
    # the manifest's `files` lists each with its sha256.
    companions: tuple[str, ...] = ()
    # A device report the builder measured itself (TFLM: the arena it bisected, which
    # `--arena-limit` gates at build time); the manifest's `deployment` section.
    deployment: dict | None = None


@dataclass(frozen=True)
class Format:
    """One artifact format.

    What it can take (`dynamic_batch`, `dynamic_length`, `several_lengths`, `variants`,
    `quantizable`) is what the parser checks (`refusal`), before any model is built.

    Attributes:
        name: the format's name on the command line and in manifests (`onnx`).
        title: how messages name it (`ONNX`).
        suffix: appended to an artifact's base name (`.onnx`; `_savedmodel` for a folder).
        default_batch: the batch when `--batch` is not given; None is a dynamic batch axis.
        atol: the default max abs diff gate of a float32 artifact.
        runtime: the runtime's distribution name, as manifests and logs report it.
        runtime_module: its import name, to tell whether it is installed without importing it.
        runtime_label: how tables name the runtime.
        layout: the head layout its graph uses where the "source" layout does not apply.
        late_softmax: whether its float graphs (no int8 activations) divide by the softmax's
            row sums after the values' matmul (export.graph.folded_attention: XNNPACK runs the
            elementwise ops faster than its SOFTMAX).
        dynamic_batch: whether the batch axis may be dynamic (`--batch dynamic`).
        quantizable: whether `--quantize` variants exist in this format.
        int8_io: whether a full-int8 file may take and return int8 (`--int8-io`).
        int8_scheme: what `--quantize int8` makes in this format: "full-integer" (int8 weights
            and activations, the activations' ranges calibrated: `--calibration`, the graph
            options of export.calibration) or "weight-only" (int8 weights per output channel,
            float32 activations: no calibration, the float32 graph).
        builder: "module:function", called as `builder(spec, fn, workdir, **options) -> Built`.
        build_options: the keyword options its builder takes (`opset`, `calibration`: a
            full-integer file's, `metadata`: the facts to write inside the file, export.runtime.metadata).
        graph_check: "module:function" called as `check(path, spec)`, or None.
        runner: "module:function" returning `(run, reported_inputs)` for `(path, threads)`,
            and for `(path, threads, signature=key)` where the format has signatures.
        signatures: whether one file holds several signatures (`--lengths`: one per bucket).
        several_lengths: whether one file can hold several lengths (`--lengths`: a signature per
            bucket, or symbolic lengths); TFLM runs one subgraph of one length.
        dynamic_length: whether length axes may be symbolic (`--query-len dynamic`).
        deployment: "module:function" called as `report(built, spec) -> dict` (the manifest's
            `deployment` section: where the file would run on a device), or None.
        variants: the only `--quantize` modes its files come in (TFLM: ("int8",)), or None for
            every mode; a format with one variant builds it whatever `--quantize` says.
        same_variant: (asked, built) pairs: `--quantize asked` builds this format's `built`
            variant. ONNX/ORT: int8-cpu (int8 weights, float activations where an integer kernel
            would be slow) is their int8 file, already weight-only with float32 activations.
        default_run: whether `python -m export` (every format) builds it.
        verify_check: "module:function" that `export.runtime.verify` calls as `check(path, manifest,
            folder)` after the golden vectors pass (TFLM: the manifest's arena runs the file, the
            generated C++ holds its bytes), raising ManifestError; or None.
        saved_model: whether `--saved-model` (a user's own graph, loops and state included)
            can build it (TFLM: no).
        metadata_reader: "module:function" called as `read(path) -> {key: text} | None`: the
            facts written inside the file (export.runtime.metadata), or None where files hold none.
        signature_reader: "module:function" called as `keys(path) -> list[str]`: the signature
            keys a file holds (`len_16`, ...), for files without a manifest beside them; or None.
        serve_platform: the platform its served models report (Open Inference Protocol model
            metadata, Triton's names: `onnxruntime_onnx`), or None for formats `export.runtime.serve`
            does not serve (export.runtime.serve; a Triton repository takes those whose platform
            a standard Triton backend runs, export.runtime.serve.triton).
    """

    name: str
    title: str
    suffix: str
    default_batch: int | None
    atol: float
    runtime: str
    runtime_module: str
    runtime_label: str
    layout: str
    dynamic_batch: bool
    quantizable: bool
    int8_io: bool
    builder: str
    build_options: tuple[str, ...]
    graph_check: str | None
    runner: str
    deployment: str | None = None
    int8_scheme: str = "full-integer"
    signatures: bool = False
    several_lengths: bool = True
    dynamic_length: bool = False
    variants: tuple[str, ...] | None = None
    same_variant: tuple[tuple[str, str], ...] = ()
    late_softmax: bool = False
    default_run: bool = True
    verify_check: str | None = None
    saved_model: bool = True  # whether `--saved-model` (a user's own graph) can build it
    metadata_reader: str | None = None
    signature_reader: str | None = None
    serve_platform: str | None = None

    def variant_for(self, quantize: str) -> str:
        """The variant this format builds when `--quantize` says `quantize`: savedmodel stays
        float32, tflm stays int8, ONNX/ORT build int8 for int8-cpu (`same_variant`), the others
        follow the flag."""
        quantize = dict(self.same_variant).get(quantize, quantize)
        if self.variants is not None:
            return quantize if quantize in self.variants else self.variants[0]
        return quantize if self.quantizable else "none"

    @property
    def is_folder(self) -> bool:
        return not self.suffix.startswith(".")

    @property
    def manifest_suffix(self) -> str:
        return f"{self.suffix}.json"

    def build(self, spec, fn, workdir: str, **options: Any) -> Built:
        """Convert the inference function `fn` into this format under `workdir`."""
        given = {k: v for k, v in options.items() if k in self.build_options}
        return _resolve(self.builder)(spec, fn, workdir, **given)

    def check_graph(self, path: str, spec) -> None:
        """Raise GraphCheckError if the file holds what its runtime should not see."""
        if self.graph_check is not None:
            _resolve(self.graph_check)(path, spec)

    def deployment_report(self, built: Built, spec) -> dict | None:
        """Where the built file would run on a device (export.<fmt>.deployment), or None."""
        if built.deployment is not None:
            return built.deployment
        return None if self.deployment is None else _resolve(self.deployment)(built, spec)

    def check_on_device(self, path: str, manifest: dict, folder: str) -> None:
        """export.runtime.verify's format-specific check (`verify_check`), if the format has one."""
        if self.verify_check is not None:
            _resolve(self.verify_check)(path, manifest, folder)

    def read_metadata(self, path: str) -> dict[str, str] | None:
        """The facts written inside the file (`metadata_reader`), or None."""
        return None if self.metadata_reader is None else _resolve(self.metadata_reader)(path)

    def signature_keys(self, path: str) -> list[str]:
        """The signature keys the file holds (`signature_reader`); none for other formats."""
        return [] if self.signature_reader is None else list(_resolve(self.signature_reader)(path))

    def open_runner(self, path: str, threads: int | None,
                    signature: str | None = None) -> tuple[Callable, list]:
        if signature is None:
            return _resolve(self.runner)(path, threads)
        return _resolve(self.runner)(path, threads, signature=signature)

    def refusal(self, *, lengths: bool = False, dynamic_batch: bool = False,
                dynamic_length: str | None = None, quantize: str | None = None) -> str | None:
        """Why this format cannot take what a command line asks, or None.

        Args:
            lengths: `--lengths` was given. dynamic_batch: `--batch dynamic`.
            dynamic_length: the flag that asked for a symbolic length (`--kv-len`), or None.
            quantize: the `--quantize` mode asked of this format alone.
        """
        if lengths and not self.several_lengths:
            return (f"{self.title} artifacts have one static length; export one file per length "
                    f"with --query-len/--kv-len. Received: --lengths")
        if dynamic_batch and not self.dynamic_batch:
            return (f"{self.title} artifacts have a static batch; --batch dynamic is not possible "
                    f"for {self.name}. Received: --batch dynamic")
        if dynamic_length and not self.dynamic_length:
            return (f"{self.title} artifacts have static lengths ({dynamic_length} dynamic); for "
                    f"several lengths in one file use --lengths 16,64,256 (one signature each)")
        if quantize not in (None, "none") and not self.quantizable:
            return f"{self.title} artifacts are float32 only. Received: --quantize {quantize}"
        if quantize is not None and self.variants is not None and quantize not in self.variants:
            return (f"{self.title} artifacts are {' or '.join(self.variants)} only. "
                    f"Received: --quantize {quantize}")
        return None


def _resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            name="savedmodel", title="SavedModel", suffix="_savedmodel", default_batch=None, atol=1e-5,
            runtime="tensorflow", runtime_module="tensorflow", runtime_label="TensorFlow",
            layout="batched-heads", dynamic_batch=True, quantizable=False, int8_io=False,
            builder="export.savedmodel.build:build_savedmodel", build_options=(),
            graph_check=None, runner="export.runtime.runtimes:savedmodel_function",
            signatures=True, dynamic_length=True,
        ),
        Format(
            name="tflite", title="TFLite", suffix=".tflite", default_batch=1, atol=1e-4,
            runtime="ai-edge-litert", runtime_module="ai_edge_litert", runtime_label="LiteRT",
            layout="per-head", dynamic_batch=False, quantizable=True, int8_io=True,
            builder="export.tflite.build:build_tflite", build_options=("calibration", "metadata"),
            graph_check="export.tflite.check:check_tflite_file",
            runner="export.runtime.runtimes:tflite_function", signatures=True,
            deployment="export.tflite.deployment:tflite_deployment", late_softmax=True,
            metadata_reader="export.runtime.metadata:read_tflite_metadata",
            signature_reader="export.runtime.runtimes:tflite_signature_keys",
            serve_platform="tensorflow_lite",
        ),
        Format(
            name="onnx", title="ONNX", suffix=".onnx", default_batch=None, atol=1e-4,
            runtime="onnxruntime", runtime_module="onnxruntime", runtime_label="onnxruntime",
            layout="batched-heads", dynamic_batch=True, quantizable=True, int8_io=False,
            builder="export.onnx.build:build_onnx", build_options=("opset", "metadata"),
            graph_check="export.onnx.check:check_onnx_file",
            runner="export.runtime.runtimes:onnx_function", dynamic_length=True,
            deployment="export.onnx.deployment:onnx_deployment", int8_scheme="weight-only",
            same_variant=(("int8-cpu", "int8"),), serve_platform="onnxruntime_onnx",
            metadata_reader="export.runtime.metadata:read_onnx_metadata",
        ),
        Format(
            name="ort", title="ORT", suffix=".ort", default_batch=1, atol=1e-4,
            runtime="onnxruntime", runtime_module="onnxruntime", runtime_label="ORT Mobile",
            layout="batched-heads", dynamic_batch=True, quantizable=True, int8_io=False,
            builder="export.ort.build:build_ort", build_options=("opset", "metadata"),
            graph_check="export.ort.check:check_ort_file",
            runner="export.runtime.runtimes:onnx_function",
            deployment="export.ort.deployment:ort_deployment", int8_scheme="weight-only",
            same_variant=(("int8-cpu", "int8"),),
            metadata_reader="export.runtime.metadata:read_onnx_metadata",
        ),
        # TensorFlow Lite for Microcontrollers: the full-int8 TFLite file, verified on TFLM's
        # own interpreter, with its smallest tensor arena and generated C++ (export.tflm).
        Format(
            name="tflm", title="TFLM", suffix=".tflm.tflite", default_batch=1, atol=1e-4,
            runtime="tflite-micro", runtime_module="tflite_micro", runtime_label="TFLM",
            layout="per-head", dynamic_batch=False, quantizable=True, int8_io=True,
            builder="export.tflm.build:build_tflm", several_lengths=False,
            build_options=("calibration", "metadata", "arena_limit"),
            graph_check="export.tflm.check:check_tflm_file",
            runner="export.tflm.runtime:tflm_function", variants=("int8",), default_run=False,
            verify_check="export.tflm.check:check_published_set", saved_model=False,
            metadata_reader="export.tflm.runtime:read_tflm_metadata",
        ),
    )
}

# What `python -m export` builds (every format but those built on request: tflm).
FORMAT_NAMES: tuple[str, ...] = tuple(n for n, f in REGISTRY.items() if f.default_run)


def get_format(name: str) -> Format:
    """The record of format `name`; SpecError naming the known formats otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise SpecError(
            f"unknown format {name!r}; known formats: {', '.join(REGISTRY)}"
        ) from None


def format_of_file(path: str) -> Format | None:
    """The format whose files are named like `path` (`x.onnx` -> onnx, `x_savedmodel/` ->
    savedmodel), or None; the longest suffix wins (`x.tflm.tflite` is tflm, not tflite)."""
    found = [f for f in REGISTRY.values()
             if (path.rstrip("/\\") if f.is_folder else path).endswith(f.suffix)]
    return max(found, key=lambda f: len(f.suffix)) if found else None


def format_of_manifest(filename: str) -> Format | None:
    """The format whose manifests are named like `filename` (`x.onnx.json` -> onnx), or None;
    the longest suffix wins (`x.tflm.tflite.json` is tflm, not tflite)."""
    found = [f for f in REGISTRY.values() if filename.endswith(f.manifest_suffix)]
    return max(found, key=lambda f: len(f.manifest_suffix)) if found else None
