"""The house rules of export/ (DESIGN.md): no import cycles, lazy imports said why, verify without
TensorFlow, xattn apart from export, and every format looked up in the one registry."""

from __future__ import annotations

import ast
import fnmatch
import os
import subprocess
import sys

import pytest
from conftest import REPO

from export.formats import FORMAT_NAMES, REGISTRY, get_format

PACKAGES = ("export", "xattn")


def _modules() -> dict[str, str]:
    """module name -> file, for every module of export and xattn."""
    found = {}
    for package in PACKAGES:
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _imports(path: str, module: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in `path`.

    `from a import b` is an import of module `a.b` where that is a module, else of `a`; imports
    under `if TYPE_CHECKING:` are left out (annotations only, never run)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    in_function: set[int] = set()
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    in_function.add(id(inner))
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING",
                                                                   "typing.TYPE_CHECKING"):
            type_only |= {id(inner) for inner in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        names = []
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        for name in dict.fromkeys(names):
            # the longest project module that `name` is or lies in
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.append((name, node.lineno, id(node) in in_function))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: {n for n, _, _ in _imports(p, m, known)} for m, p in modules.items()}


def test_no_import_cycle_in_export_lazy_imports_included():
    graph = _graph()
    # A package's own __init__ is imported before its submodules anyway: an edge to it is no cycle.
    edges = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_xattn_never_imports_export():
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.startswith("export"))
           for m, deps in graph.items() if m.startswith("xattn")}
    assert not any(bad.values()), bad


def test_every_lazy_import_says_why():
    modules = _modules()
    unexplained = []
    for module, path in modules.items():
        lines = open(path, encoding="utf-8").read().splitlines()
        tree = ast.parse("\n".join(lines))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    # the import's line or one of the three above it (a block of lazy imports)
                    text = " ".join(lines[max(0, inner.lineno - 4):inner.lineno])
                    if "lazy" not in text:
                        unexplained.append(f"{module}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a `lazy: why` comment:\n" + "\n".join(
        unexplained)


def test_verify_and_the_entry_parsers_import_no_tensorflow():
    code = (
        "import sys\n"
        "import export.verify, export.verify.__main__, export.runtime.verify, export.cli\n"
        "import export.formats, export.runtime.manifest, export.serve, export.runtime.serve.cli\n"
        "import export.onnx, export.tflite, export.savedmodel, export.bench, export.onnx.check\n"
        "import export.tflite.check, export.ort, export.ort.check, export.runtime.metadata\n"
        "import export.deployment, export.tflm, export.tflm.check, export.tflm.runtime\n"
        "import export.onnx.deployment, export.ort.deployment, export.tflite.deployment\n"
        "import export.tflm.cpp, export.tflm.__main__\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported {done.stdout.strip()}"


def test_registry_records_are_complete_and_resolve():
    assert FORMAT_NAMES == ("savedmodel", "tflite", "onnx", "ort")
    suffixes = [f.suffix for f in REGISTRY.values()]
    assert len(set(suffixes)) == len(suffixes)
    for fmt in REGISTRY.values():
        targets = (fmt.builder, fmt.runner, fmt.graph_check, fmt.deployment, fmt.verify_check,
                   fmt.metadata_reader, fmt.signature_reader)
        for target in filter(None, targets):
            module, _, attr = target.partition(":")
            path = _modules()[module]
            tree = ast.parse(open(path, encoding="utf-8").read())
            defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert attr in defined, f"{fmt.name}: {target} is not a function of {path}"
    with pytest.raises(ValueError, match="unknown format 'coreml'; known formats: savedmodel"):
        get_format("coreml")


@pytest.mark.parametrize("fmt", list(REGISTRY))
def test_each_format_entry_is_thin_and_its_builder_knows_no_argparse(fmt):
    entry = open(os.path.join(REPO, "export", fmt, "__main__.py"), encoding="utf-8").read()
    assert len(entry.splitlines()) <= 15 and "from export.cli import main" in entry
    for name in os.listdir(os.path.join(REPO, "export", fmt)):
        if name.endswith(".py") and name != "__main__.py":
            text = open(os.path.join(REPO, "export", fmt, name), encoding="utf-8").read()
            assert "argparse" not in text and "export.cli" not in text, f"export/{fmt}/{name}"


# -- layers (docs/development.md, Layout): each module imports only its own layer and those below --

# Low to high. A module may import (lazily too) modules of its own layer and of the layers below,
# never one above. Every module of export/ and xattn/ is named here, in exactly one layer (fnmatch
# patterns: `*.__main__` are the `python -m` aliases); a new module must be placed.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Standard library and numpy helpers anything may use: errors, names, publishing, caches,
    # how commands report, the raw golden files, native output, signing, the manifest's schema,
    # and each format package's leaf helpers (no registry, no runtime, no TensorFlow).
    ("base", ("export.errors", "export.names", "export.publish", "export.caches",
              "export.reporting", "export.runtime", "export.runtime.golden_raw",
              "export.runtime.native_output", "export.runtime.signing", "export.runtime.schema",
              "export.onnx", "export.ort", "export.tflite", "export.savedmodel", "export.tflm",
              "export.bench", "export.onnx.axes", "export.tflite.signatures",
              "export.ort.serialize", "export.tflm.ops", "export.tflm.cpp")),
    # The format registry and what to build: records, specs, length buckets.
    ("registry", ("export", "export.formats", "export.spec", "export.buckets")),
    # The runtime half (`pip install ".[runtime]"`): the manifest, the gate, the runners, verify,
    # serve, files of several lengths, and each format's runtime modules (runner, checks).
    ("runtime", ("export.runtime.manifest", "export.runtime.check", "export.runtime.metadata",
                 "export.runtime.runtimes", "export.runtime.verify", "export.runtime.serve",
                 "export.runtime.serve.deployments", "export.runtime.serve.embedded",
                 "export.runtime.serve.endpoint", "export.runtime.serve.grpc_service",
                 "export.runtime.serve.loadgen", "export.runtime.serve.protocol",
                 "export.runtime.serve.triton", "export.runtime.serve.worker", "export.bucketed",
                 "export.tflm.runtime", "export.tflm.check", "export.onnx.check",
                 "export.ort.check", "export.tflite.check",
                 # the documented paths of three moved modules (aliases: each *is* the module)
                 "export.runtimes", "export.manifest", "export.serve.protocol")),
    # The layer (Keras 3): what the build half traces; nothing TF-free may import it.
    ("layer", ("xattn", "xattn.layer")),
    # The build half: references, the folded graph, each format's builder, variants and
    # deployment report, sealing sets.
    ("build", ("export.graph", "export.reference", "export.keras2", "export.model",
               "export.model_load", "export.model_rewrites", "export.saved_model_reference",
               "export.calibration", "export.deployment", "export.resources", "export.sets",
               "export.onnx.build", "export.onnx.quantize", "export.onnx.deployment",
               "export.ort.build", "export.ort.deployment", "export.savedmodel.build",
               "export.tflite.build", "export.tflite.quantize", "export.tflite.deployment",
               "export.tflm.build")),
    # Reference -> build -> verify -> manifest -> publish, and the ARM emulation it may run.
    ("pipeline", ("export.pipeline", "export.arm", "export.arm.cache", "export.arm.emulate")),
    # Command lines: flags, parsing into requests, every entry point and alias, the benchmarks.
    ("commands", ("export.flags", "export.request", "export.cli", "export.command", "*.__main__",
                  "export.arm.cli", "export.bench.*", "export.runtime.verify.cli",
                  "export.runtime.serve.cli", "export.runtime.serve.loadbench", "export.verify",
                  "export.serve", "export.serve.loadbench")),
)
LAYER_NAMES = tuple(name for name, _ in LAYERS)


def _layers_of(module: str) -> list[str]:
    return [name for name, patterns in LAYERS if any(fnmatch.fnmatchcase(module, p) for p in patterns)]


def _layer(module: str) -> int:
    return LAYER_NAMES.index(_layers_of(module)[0])


def test_every_module_is_in_exactly_one_layer():
    placed = {m: _layers_of(m) for m in _modules()}
    unplaced = sorted(m for m, layers in placed.items() if not layers)
    twice = {m: layers for m, layers in placed.items() if len(layers) > 1}
    assert not unplaced, f"place these modules in a layer of LAYERS: {unplaced}"
    assert not twice, f"modules in more than one layer: {twice}"


def test_no_module_imports_one_above_its_layer_lazy_imports_included():
    modules = _modules()
    known = set(modules)
    upward = []
    for module, path in sorted(modules.items()):
        for dep, line, lazy in _imports(path, module, known):
            if module.startswith(dep + "."):
                continue  # its own package, imported before it anyway
            if _layer(dep) > _layer(module):
                upward.append(f"{os.path.relpath(path, REPO)}:{line}: {module} "
                              f"({LAYER_NAMES[_layer(module)]}) imports {dep} "
                              f"({LAYER_NAMES[_layer(dep)]}){' lazily' if lazy else ''}")
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_module_outside_a_format_package_imports_its_modules():
    """A format's code is reached through the registry (its "module:function" records); only
    its own package, another format's build on top of it, the aliases and the benchmarks (which
    time format internals on purpose) import it by name."""
    modules = _modules()
    known = set(modules)
    formats = tuple(f"export.{name}." for name in REGISTRY)
    outside = []
    for module, path in sorted(modules.items()):
        if module.startswith(formats + ("export.bench.",)) or module.endswith(".__main__"):
            continue
        for dep, line, _ in _imports(path, module, known):
            if dep.startswith(formats):
                outside.append(f"{module}:{line} imports {dep}")
    assert not outside, "\n".join(outside)


# -- the two halves (DESIGN.md): what runs on a device imports nothing of what builds -------------

# The runtime half is the package export.runtime and what it reaches: the base and registry
# layers, the runtime layer (each format's runtime modules: the registry names them, resolved at
# run time), and the one command-line module the runtime's commands share with exporting.
RUNTIME_PACKAGE = "export.runtime"
RUNTIME_LAYERS = ("base", "registry", "runtime")
SHARED_COMMANDS = ("export.flags",)
HEAVY = ("tensorflow", "keras", "tf2onnx", "onnx")
# Where the runtime half may still import one of HEAVY, lazily, and why.
HEAVY_ALLOWED = {
    ("export.runtime.runtimes", "tensorflow"): "the SavedModel runner: TensorFlow is that format's runtime",
    ("export.flags", "onnx"): "--opset's default, computed when a builder's --help prints it",
}


def _in_runtime_half(module: str) -> bool:
    return (module == RUNTIME_PACKAGE or module.startswith(RUNTIME_PACKAGE + ".")
            or module in SHARED_COMMANDS or LAYER_NAMES[_layer(module)] in RUNTIME_LAYERS)


def _third_party(path: str) -> set[str]:
    """The top-level names of every non-project module `path` imports (at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found - set(PACKAGES)


def _runtime_closure() -> dict[str, str]:
    """module -> the module that brought it in, for everything export.runtime imports, with the
    registry's runtime targets (lazy imports included; a submodule brings its packages)."""
    graph, known = _graph(), set(_modules())
    roots = [m for m in known if m == RUNTIME_PACKAGE or m.startswith(RUNTIME_PACKAGE + ".")]
    roots += [target.partition(":")[0] for f in REGISTRY.values()
              for target in (f.runner, f.verify_check, f.metadata_reader, f.signature_reader) if target]
    via = {root: "(root)" for root in roots}
    stack = list(roots)
    while stack:
        module = stack.pop()
        parts = module.split(".")
        parents = [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in known]
        for dep in sorted(graph.get(module, set()) | set(parents)):
            if dep not in via:
                via[dep] = module
                stack.append(dep)
    return via


def test_the_runtime_half_imports_nothing_of_the_build_half():
    via = _runtime_closure()
    crossing = {m: via[m] for m in via if not _in_runtime_half(m)}
    assert not crossing, f"runtime half -> build half (module: imported by): {crossing}"
    assert {"export.runtime.verify", "export.runtime.serve.worker", "export.runtime.manifest",
            "export.runtime.runtimes", "export.tflm.runtime"} <= set(via)  # the real closure


def test_the_runtime_half_imports_tensorflow_and_co_only_where_said():
    modules = _modules()
    heavy = {(m, name) for m in _runtime_closure() for name in _third_party(modules[m]) & set(HEAVY)}
    assert heavy == set(HEAVY_ALLOWED), heavy ^ set(HEAVY_ALLOWED)


# Where a module outside the format packages may still compare with a format's name, and why.
NAME_BRANCHES_ALLOWED = {
    "export.bench.*": "the benchmark's tables compare runtimes side by side (ours against Keras's "
                      "own exports): they are about those runtimes, not a format capability",
    "export.runtime.serve.loadbench": "the load benchmark is defined on ONNX files: its in-process "
                                      "ceiling is onnxruntime's session.run",
}


def test_nothing_outside_a_format_package_branches_on_its_name_or_suffix():
    names = set(REGISTRY) | {f.suffix for f in REGISTRY.values()}
    formats = tuple(f"export.{name}." for name in REGISTRY)
    found = []
    for module, path in sorted(_modules().items()):
        if module.startswith(formats) or any(fnmatch.fnmatchcase(module, p) for p in NAME_BRANCHES_ALLOWED):
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hits = [v.value for v in values if isinstance(v, ast.Constant) and v.value in names]
                found += [f"{module}:{node.lineno} compares with {hit!r}" for hit in hits]
    assert not found, "use a registry capability (export.formats.Format):\n" + "\n".join(found)


def test_no_private_name_is_imported_from_another_package():
    """A name shared across packages (export.runtime.verify's parser and export.flags) is public;
    `_private` names stay within their package."""
    crossing = []
    for module, path in sorted(_modules().items()):
        package = module.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                    and node.module.startswith(PACKAGES)):
                continue
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            if private and node.module.rpartition(".")[0] != package and node.module != package:
                crossing.append(f"{module}:{node.lineno} imports {', '.join(private)} from {node.module}")
    assert not crossing, "\n".join(crossing)


# -- the old import paths the API reference documented (the runtime half moved) ------------------

MOVED = {"export.runtimes": "export.runtime.runtimes", "export.manifest": "export.runtime.manifest",
         "export.serve.protocol": "export.runtime.serve.protocol"}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_documented_import_path_of_a_moved_module_still_imports(old):
    """`from export import runtimes` (the examples), `::: export.manifest` and
    `::: export.serve.protocol` (docs/reference/api.md) named these before the move."""
    import importlib

    package, _, name = old.rpartition(".")
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])
    assert getattr(importlib.import_module(package), name) is importlib.import_module(MOVED[old])
