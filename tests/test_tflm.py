"""TFLM (`python -m export.tflm`): the full-int8 file on TensorFlow Lite for Microcontrollers' own
interpreter, its smallest arena, its generated C++ (compiled with g++), and every failure path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_module

from export.runtime.check import parity_metrics
from export.tflm.cpp import read_model_data
from export.tflm.ops import TFLM_OPS, read_model
from export.tflm.runtime import TflmModel, smallest_arena, tflm_function

MASKED = dict(query_mask=True, value_mask=True, causal=True, scores=True)
# The ops of the layer's int8 graph (TFLite builtin names), and those its masks add.
PLAIN_OPS = {"QUANTIZE", "FULLY_CONNECTED", "RESHAPE", "BATCH_MATMUL", "SOFTMAX", "DEQUANTIZE"}


@pytest.fixture(scope="module")
def plain(artifact_factory):
    out, results = artifact_factory(formats=("tflm",), quantize="int8")
    return out, results["tflm"]


@pytest.fixture(scope="module")
def masked(artifact_factory):
    out, results = artifact_factory(formats=("tflm",), quantize="int8", **MASKED)
    return out, results["tflm"]


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_the_set_is_named_apart_from_tflite_and_lists_its_cpp(plain):
    out, result = plain
    assert result.path.endswith("_int8.tflm.tflite")
    stem = os.path.basename(result.path)[: -len(".tflm.tflite")]
    names = [f"{stem}_model_data.h", f"{stem}_model_data.cc", f"{stem}_op_resolver.h"]
    listed = result.manifest["files"]
    assert [e["file"] for e in listed] == names
    for entry in listed:
        path = os.path.join(out, entry["file"])
        assert os.path.isfile(path)
        assert entry["bytes"] == os.path.getsize(path)
    assert result.manifest["quantization"]["scheme"] == "full-integer"
    assert result.manifest["parity"]["runtime"].startswith("tflite-micro ")


def test_inputs_are_placed_by_signature_name_not_by_position(plain):
    """TFLM has no names: the converter puts source2 first. A runner feeding by position would
    swap the sources; ours feeds by the signature's names and passes the gate."""
    out, result = plain
    facts = read_model(_bytes(result.path))
    assert facts.inputs == {"source2": 0, "source1": 1}
    golden = np.load(os.path.join(out, result.manifest["golden"]))
    run, reported = tflm_function(result.path)
    assert [i.name for i in reported] == ["source2", "source1"]
    feeds = {"source1": golden["source1"][:1], "source2": golden["source2"][:1]}
    right = parity_metrics({"output": golden["output"][:1]}, run(feeds))
    assert right["rel_l2"] < 0.05
    # Feeding source1 where source2 goes (what a positional runner would do) misses by far.
    swapped = parity_metrics({"output": golden["output"][:1]},
                             run({"source1": feeds["source2"], "source2": feeds["source1"]}))
    assert swapped["rel_l2"] > 0.5


@pytest.mark.parametrize("variant", ["plain", "masked"])
def test_tflm_matches_litert_on_the_same_file(variant, request):
    """The int8 kernels: TFLM's reference kernels and LiteRT's give nearly the same numbers on
    the same bytes, and both are within the int8 gate of the Keras reference."""
    out, result = request.getfixturevalue(variant)
    from export.runtime.runtimes import tflite_function

    golden = np.load(os.path.join(out, result.manifest["golden"]))
    feeds = {i["name"]: golden[i["name"]][:1] for i in result.manifest["inputs"]}
    outputs = {o["name"]: golden[o["name"]][:1] for o in result.manifest["outputs"]}
    tflm_run, _ = tflm_function(result.path)
    litert_run, _ = tflite_function(result.path, 1)
    on_tflm, on_litert = tflm_run(feeds), litert_run(feeds)
    assert sorted(on_tflm) == sorted(outputs)
    assert parity_metrics(outputs, on_tflm)["rel_l2"] < 0.05
    assert parity_metrics(on_litert, on_tflm)["rel_l2"] < 0.01


def test_ops_are_the_files_and_each_has_a_tflm_kernel(plain, masked):
    assert set(plain[1].manifest["deployment"]["ops"]) == PLAIN_OPS
    masked_ops = set(masked[1].manifest["deployment"]["ops"])
    assert PLAIN_OPS < masked_ops
    assert masked_ops <= set(TFLM_OPS)
    assert masked[1].manifest["deployment"]["op_resolver"] == (
        f"tflite::MicroMutableOpResolver<{len(masked_ops)}>")


def test_arena_is_the_smallest_that_runs(plain):
    _, result = plain
    report = result.manifest["deployment"]
    arena = report["arena_bytes"]
    assert 4096 < arena < 64 * 1024
    assert report["arena_search"] | {"runs": None} == {
        "low": 1024, "high": 64 << 20, "granularity": 1, "tries": report["arena_search"]["tries"],
        "runs": None}
    model = TflmModel.read(_bytes(result.path))
    assert model.runs_in(arena)
    assert not model.runs_in(arena - 1)
    assert not model.runs_in(arena - 16)
    # The same answer when measured again (the bisection does not depend on the run).
    assert smallest_arena(_bytes(result.path))["arena_bytes"] == arena
    assert report["flash_bytes"] == os.path.getsize(result.path)
    assert report["fits_256k_ram"] is True
    header = open(os.path.join(os.path.dirname(result.path), report["files"]["model_data_h"])).read()
    assert f"_arena_bytes = {arena};" in header


def test_model_data_reads_back_into_the_file_bytes(plain):
    out, result = plain
    cc = open(os.path.join(out, result.manifest["deployment"]["files"]["model_data_cc"])).read()
    assert read_model_data(cc) == _bytes(result.path)
    assert "alignas(16) const unsigned char" in cc
    assert f"_model_data_len = {os.path.getsize(result.path)};" in cc


def test_op_resolver_adds_exactly_the_files_ops(masked):
    out, result = masked
    ops = result.manifest["deployment"]["ops"]
    text = open(os.path.join(out, result.manifest["deployment"]["files"]["op_resolver_h"])).read()
    calls = re.findall(r"resolver\.(Add\w+)\(\)", text)
    assert sorted(calls) == sorted(TFLM_OPS[op] for op in ops)
    assert f"MicroMutableOpResolver<{len(ops)}>" in text


# What TFLM's micro_mutable_op_resolver.h declares, for the ops these files use (written out here,
# not generated from export.tflm.ops: a wrong method name there fails to compile).
STUB_RESOLVER = """
#pragma once
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
namespace tflite {
template <unsigned int tOpCount>
class MicroMutableOpResolver {
 public:
  TfLiteStatus AddAdd() { return Added(); }
  TfLiteStatus AddBatchMatMul() { return Added(); }
  TfLiteStatus AddCast() { return Added(); }
  TfLiteStatus AddConcatenation() { return Added(); }
  TfLiteStatus AddDequantize() { return Added(); }
  TfLiteStatus AddFullyConnected() { return Added(); }
  TfLiteStatus AddLess() { return Added(); }
  TfLiteStatus AddMul() { return Added(); }
  TfLiteStatus AddQuantize() { return Added(); }
  TfLiteStatus AddReduceMin() { return Added(); }
  TfLiteStatus AddReshape() { return Added(); }
  TfLiteStatus AddSelectV2() { return Added(); }
  TfLiteStatus AddSoftmax() { return Added(); }
  TfLiteStatus AddStridedSlice() { return Added(); }
  TfLiteStatus AddSub() { return Added(); }
  TfLiteStatus AddTranspose() { return Added(); }
  unsigned int count = 0;
 private:
  TfLiteStatus Added() { return ++count <= tOpCount ? kTfLiteOk : kTfLiteError; }
};
}  // namespace tflite
"""

# Dumps the array, checks its alignment and that the resolver takes every op it registers.
MAIN = """
#include <cstdint>
#include <cstdio>
#include "{stem}_model_data.h"
#include "{stem}_op_resolver.h"
int main() {{
  if (reinterpret_cast<std::uintptr_t>({ident}_model_data) % 16 != 0) return 3;
  {ident}_op_resolver resolver;
  if ({ident}_register_ops(resolver) != kTfLiteOk) return 4;
  std::printf("ops %u arena %zu\\n", resolver.count, {ident}_arena_bytes);
  std::FILE* f = std::fopen("dumped.bin", "wb");
  std::fwrite({ident}_model_data, 1, {ident}_model_data_len, f);
  std::fclose(f);
  return 0;
}}
"""


@pytest.mark.parametrize("variant", ["plain", "masked"])
def test_generated_cpp_compiles_links_and_holds_the_file(variant, request, tmp_path):
    """g++ -std=c++17 compiles the three files against a stub of TFLM's resolver header; the
    linked program's array is byte for byte the .tflite, 16-byte aligned, and the resolver's
    template size is exactly the number of ops it adds."""
    out, result = request.getfixturevalue(variant)
    files = result.manifest["deployment"]["files"]
    for name in files.values():
        shutil.copy(os.path.join(out, name), tmp_path)
    stub = tmp_path / "tensorflow" / "lite" / "micro"
    stub.mkdir(parents=True)
    (stub / "micro_mutable_op_resolver.h").write_text(STUB_RESOLVER)
    stem = files["model_data_cc"][: -len("_model_data.cc")]
    (tmp_path / "main.cc").write_text(MAIN.format(stem=stem, ident=stem))
    for source in (files["model_data_cc"], "main.cc"):
        syntax = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-fsyntax-only", "-I.",
                                 source], cwd=tmp_path, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    built = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-I.", "-o", "dump",
                            files["model_data_cc"], "main.cc"], cwd=tmp_path, capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run(["./dump"], cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    deployment = result.manifest["deployment"]
    assert ran.stdout.split() == ["ops", str(len(deployment["ops"])),
                                  "arena", str(deployment["arena_bytes"])]
    assert (tmp_path / "dumped.bin").read_bytes() == _bytes(result.path)


# Names the name rule accepts that are no C++ identifier as they are (issue 27): a digit first,
# `-`, `.`, `__`, a trailing `_`, 128 characters, and two that differ only in `-`/`_` or in case.
HOSTILE_STEMS = ["9lives_int8", "a-b_int8", "a_b_int8", "A__B_int8", "v1.2_int8", "trail__int8",
                 "Foo_int8", "foo_int8", "7" + "-x" * 63 + "_int8"]


def test_generated_cpp_compiles_for_every_kind_of_name_in_one_program(plain, tmp_path):
    """The three files of the real int8 file, written under each hostile stem, all included and
    linked into one g++ -Wall -Werror program: guards and symbols valid, unreserved, and apart
    (one program holding them all would fail on a shared guard or symbol), each array the file."""
    from export.tflm.cpp import c_identifier, write_cpp

    _, result = plain
    data = _bytes(result.path)
    ops = result.manifest["deployment"]["ops"]
    stub = tmp_path / "tensorflow" / "lite" / "micro"
    stub.mkdir(parents=True)
    (stub / "micro_mutable_op_resolver.h").write_text(STUB_RESOLVER)
    includes, body, sources = [], [], []
    for i, stem in enumerate(HOSTILE_STEMS):
        write_cpp(str(tmp_path), stem, data, ops, artifact=f"{stem}.tflm.tflite", sha256="0" * 64,
                  arena_bytes=1000 + i)
        ident = c_identifier(stem)
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(_[A-Za-z0-9]+)*", ident), ident
        includes += [f'#include "{stem}_model_data.h"', f'#include "{stem}_op_resolver.h"',
                     f'#include "{stem}_model_data.h"']  # twice: the guard must hold
        body.append(f"""  {{
    {ident}_op_resolver r;
    if ({ident}_register_ops(r) != kTfLiteOk) return 4;
    if ({ident}_arena_bytes != {1000 + i}u) return 5;
    std::FILE* f = std::fopen("dumped{i}.bin", "wb");
    std::fwrite({ident}_model_data, 1, {ident}_model_data_len, f);
    std::fclose(f);
  }}""")
        sources.append(f"{stem}_model_data.cc")
    assert len({c_identifier(s) for s in HOSTILE_STEMS}) == len(HOSTILE_STEMS)
    (tmp_path / "main.cc").write_text("#include <cstdio>\n" + "\n".join(includes)
                                      + "\nint main() {\n" + "\n".join(body) + "\n  return 0;\n}\n")
    built = subprocess.run(["g++", "-std=c++17", "-Wall", "-Werror", "-I.", "-o", "dump", *sources,
                            "main.cc"], cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    ran = subprocess.run(["./dump"], cwd=tmp_path, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    for i in range(len(HOSTILE_STEMS)):
        assert (tmp_path / f"dumped{i}.bin").read_bytes() == data


def test_verify_runs_tflm_files_on_tflm_and_checks_the_cpp(plain, tmp_path):
    out, result = plain
    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    done = run_module("export.verify", str(copy / os.path.basename(result.path)))
    assert done.returncode == 0, done.stderr
    assert "rel L2" in done.stdout and done.stdout.startswith("✓")
    # One byte of the generated array changed: the set fails, naming the file.
    cc = copy / result.manifest["deployment"]["files"]["model_data_cc"]
    cc.write_text(cc.read_text().replace("0x1c,", "0x1d,", 1))
    done = run_module("export.verify", str(copy))
    assert done.returncode == 1
    assert f"file {cc.name} sha256 mismatch" in done.stdout


def test_verify_stays_tensorflow_free_with_tflm():
    code = ("import sys, export.runtime.verify, export.tflm.runtime, export.tflm.check, export.tflm.cpp\n"
            "import export.runtime.metadata; export.tflm.runtime.read_tflm_metadata\n"
            "print(','.join(m for m in ('tensorflow', 'keras', 'tf2onnx', 'ai_edge_litert') "
            "if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_int8_io_file_runs_on_tflm(artifact_factory):
    out, results = artifact_factory(formats=("tflm",), quantize="int8", int8_io=True)
    result = results["tflm"]
    assert result.manifest["inputs"][0]["dtype"] == "int8"
    _, reported = tflm_function(result.path)
    assert {i.stored_dtype for i in reported} == {"int8"}
    done = run_module("export.verify", out)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the command line: one line and a documented exit code on every failure -----------------------


def _only_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_arena_limit_below_the_smallest_arena_fails_and_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    done = run_module("export.tflm", "--units", "16", "--heads", "2", "--arena-limit", "2048",
                      "-q", "--output-dir", str(out))
    assert done.returncode == 1
    line = _only_line(done.stderr)
    assert re.search(r"needs a [\d,]+-byte tensor arena .*; --arena-limit is 2,048 bytes", line)
    assert [n for n in os.listdir(out) if not n.startswith(".")] == []


def test_arena_limit_that_fits_is_recorded(tmp_path):
    out = tmp_path / "out"
    done = run_module("export.tflm", "--units", "16", "--heads", "2", "--arena-limit", "262144",
                      "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert "arena " in done.stdout and "flash " in done.stdout
    (manifest,) = [n for n in os.listdir(out) if n.endswith(".tflm.tflite.json")]
    report = json.load(open(out / manifest))["deployment"]
    assert report["arena_limit"] == 262144 and report["arena_bytes"] <= 262144


def test_op_without_a_tflm_kernel_fails_in_one_line_naming_it(tmp_path):
    """GELU has int8 TFLite kernels but no TFLM one: exit 4, the op named, nothing published."""
    model = tmp_path / "gelu.keras"
    code = ("import keras\n"
            "x = keras.Input((8, 16), name='x')\n"
            "y = keras.layers.Activation('gelu')(keras.layers.Dense(16)(x))\n"
            f"keras.Model(x, y).save({str(model)!r})\n")
    made = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    out = tmp_path / "out"
    done = run_module("export.tflm", "--model", str(model), "-q", "--output-dir", str(out))
    assert done.returncode == 4
    line = _only_line(done.stderr)
    assert "no TFLM kernel for op(s) GELU " in line
    assert [n for n in os.listdir(out) if not n.startswith(".")] == []


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "float16"], "invalid choice: 'float16' (choose from 'int8')"),
    (["--lengths", "8,16"], "TFLM artifacts have one static length"),
    (["--batch", "dynamic"], "static batch"),
    (["--arena-limit", "0"], "--arena-limit: must be a positive integer"),
], ids=["float16", "lengths", "dynamic-batch", "zero-limit"])
def test_usage_errors_exit_2_in_one_line(argv, message, tmp_path):
    done = run_module("export.tflm", *argv, "-q", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 2
    assert message in _only_line(done.stderr)


def _edit_manifest(path, change) -> None:
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)


def test_verify_runs_the_file_in_the_manifests_arena(plain, tmp_path):
    """The arena an engineer copies into the firmware is checked on TFLM by export.runtime.verify: a
    manifest promising 16 bytes less than the smallest arena fails."""
    out, result = plain
    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    manifest = copy / os.path.basename(result.manifest_path)
    arena = result.manifest["deployment"]["arena_bytes"]
    _edit_manifest(manifest, lambda m: m["deployment"].update(arena_bytes=arena - 16))
    done = run_module("export.verify", str(manifest))
    assert done.returncode == 1
    assert f"TFLM cannot run the file in the manifest's {arena - 16:,}-byte tensor arena" in done.stdout


def test_verify_refuses_model_data_that_is_not_the_artifact(plain, tmp_path):
    """A .cc whose sha256 the manifest was made to agree with still has to hold the file."""
    from export.publish import sha256_path

    out, result = plain
    copy = tmp_path / "set"
    shutil.copytree(out, copy)
    name = result.manifest["deployment"]["files"]["model_data_cc"]
    cc = copy / name
    cc.write_text(cc.read_text().replace("0x1c,", "0x1d,", 1))
    digest = sha256_path(str(cc))

    def agree(m):
        for entry in m["files"]:
            if entry["file"] == name:
                entry["sha256"], entry["bytes"] = digest, os.path.getsize(cc)

    _edit_manifest(copy / os.path.basename(result.manifest_path), agree)
    done = run_module("export.verify", str(copy))
    assert done.returncode == 1
    size = os.path.getsize(result.path)
    assert f"{name} holds {size:,} bytes that are not the artifact's {size:,}" in done.stdout


def test_signed_tflm_set_covers_the_generated_cpp(tmp_path):
    """`--sign-key` signs the C++ with the set: a changed header fails on the signature first."""
    pytest.importorskip("model_signing")
    from test_trust import write_key_pair

    from export.pipeline import ExportRequest, export_artifacts
    from export.runtime import verify
    from export.spec import ArtifactSpec

    private, public = write_key_pair(tmp_path, "key")
    out = tmp_path / "out"
    spec = ArtifactSpec(units=16, heads=2, query_features=8, kv_features=8, batch=1, quantize="int8")
    (result,) = export_artifacts(ExportRequest(specs={"tflm": spec}, output_dir=str(out),
                                               sign_key=private))
    (passed,) = verify.verify_path(str(out), public_key=public)
    assert passed.status == "passed" and passed.signature == "signature ok"
    header = out / result.manifest["deployment"]["files"]["op_resolver_h"]
    header.write_text(header.read_text().replace("AddSoftmax", "AddSoftmaxX"))
    (failed,) = verify.verify_path(str(out), public_key=public)
    assert failed.status == "failed"
    assert failed.reason.startswith(f"changed after signing: {header.name}"), failed.reason
