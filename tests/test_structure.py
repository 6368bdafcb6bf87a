"""The house rules of export/ (DESIGN.md): no import cycles, lazy imports said why, verify without
TensorFlow, xattn apart from export, and every format looked up in the one registry."""

from __future__ import annotations

import ast
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
    """(imported project module, line, inside a function) for every import in `path`."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    in_function.add(id(inner))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
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
        "import export.verify, export.verify.__main__, export.cli, export.formats, export.manifest\n"
        "import export.onnx, export.tflite, export.savedmodel, export.bench, export.onnx.check\n"
        "import export.tflite.check, export.ort, export.ort.check, export.metadata\n"
        "import export.deployment, export.tflm, export.tflm.check, export.tflm.runtime\n"
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
        for target in (fmt.builder, fmt.runner) + ((fmt.graph_check,) if fmt.graph_check else ()):
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


# -- the two halves (DESIGN.md): what runs on a device imports nothing of what builds -------------

# What `export.verify` and `export.serve` run, with the code the registry names for them (each
# format's runner and verify check, resolved at run time from "module:function" strings).
RUNTIME_ROOTS = ("export.verify.cli", "export.serve.cli", "export.serve.worker",
                 "export.serve.embedded", "export.schema", "export.caches", "export.reporting")
# The build half: references, the folded graph, the pipeline, the export command line, the
# builders and quantizers of every format, the benchmarks, the layer itself.
BUILD_HALF = ("export.pipeline", "export.request", "export.reference", "export.graph",
              "export.model", "export.model_load", "export.model_rewrites", "export.calibration",
              "export.resources", "export.deployment", "export.cli", "export.sets", "export.bench",
              "export.arm", "xattn") + tuple(
    f"export.{fmt}.{part}" for fmt in REGISTRY for part in ("build", "quantize", "signatures"))
HEAVY = ("tensorflow", "keras", "tf2onnx", "onnx")
# Where the runtime half may still import one of HEAVY, lazily, and why.
HEAVY_ALLOWED = {
    ("export.runtimes", "tensorflow"): "the SavedModel runner: TensorFlow is that format's runtime",
    ("export.flags", "tf2onnx"): "--opset's default, computed when a builder's --help prints it",
    ("export.flags", "onnx"): "--opset's default, computed when a builder's --help prints it",
}


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
    """module -> the module that brought it in, for everything the runtime roots import (lazy
    imports included; a submodule brings its packages)."""
    graph, known = _graph(), set(_modules())
    roots = list(RUNTIME_ROOTS) + [target.partition(":")[0] for f in REGISTRY.values()
                                   for target in (f.runner, f.verify_check) if target]
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
    crossing = {m: via[m] for m in via if m.startswith(tuple(b + "." for b in BUILD_HALF))
                or m in BUILD_HALF}
    assert not crossing, f"runtime half -> build half (module: imported by): {crossing}"
    assert {"export.verify", "export.serve.worker", "export.manifest", "export.runtimes",
            "export.tflm.runtime"} <= set(via)  # the closure is the real one


def test_the_runtime_half_imports_tensorflow_and_co_only_where_said():
    modules = _modules()
    heavy = {(m, name) for m in _runtime_closure() for name in _third_party(modules[m]) & set(HEAVY)}
    assert heavy == set(HEAVY_ALLOWED), heavy ^ set(HEAVY_ALLOWED)
