"""The manifest's JSON Schema (export/runtime/manifest.schema.json): one file, applied by the Python verifier
(export.runtime.schema) and by the JavaScript one (web/lib/schema.mjs), which agree on every document."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO

from export.errors import ManifestError
from export.runtime import manifest as manifests
from export.runtime import schema

SHA = "ab" * 32
VALID = {
    "format": "onnx", "artifact": "x.onnx", "sha256": SHA, "bytes": 10,
    "files": [{"file": "x.h", "sha256": SHA, "bytes": 3}],
    "inputs": [{"name": "source1", "shape": [None, 10, 64], "dtype": "float32"},
               {"name": "ids", "shape": [None, 10], "dtype": "int32", "range": [0, 20]}],
    "outputs": [{"name": "output", "shape": [1, 10, 64], "dtype": "float32"}],
    "reference": "x.keras", "reference_sha256": SHA, "golden": "x.golden.npz", "golden_sha256": SHA,
    "golden_raw": {"index": "x.golden.json", "data": "x.golden.bin", "sha256": SHA, "index_sha256": SHA},
    "quantization": {"mode": "none"}, "parity": {"atol": 1e-4, "max_abs": 1e-6},
    "deployment": None, "anything": {"else": True},
}


def _without(key):
    def change(m):
        del m[key]
    return change


def _set(path, value):
    def change(m):
        target = m
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return change


# id: (change, the problem's path)
BROKEN = {
    "no-format": (_without("format"), "$ lacks 'format'"),
    "no-parity": (_without("parity"), "$ lacks 'parity'"),
    "format-number": (_set(["format"], 3), "$.format must be string"),
    "artifact-empty": (_set(["artifact"], ""), "$.artifact must hold at least 1"),
    "sha-short": (_set(["sha256"], "ab" * 31), "$.sha256 must match"),
    "sha-not-hex": (_set(["golden_sha256"], "zz" * 32), "$.golden_sha256 must match"),
    "bytes-negative": (_set(["bytes"], -1), "$.bytes must be >= 0"),
    "bytes-bool": (_set(["bytes"], True), "$.bytes must be integer"),
    "bytes-float": (_set(["bytes"], 1.5), "$.bytes must be integer"),
    "inputs-empty": (_set(["inputs"], []), "$.inputs must hold at least 1"),
    "input-no-shape": (_set(["inputs", 0], {"name": "a"}), "$.inputs[0] lacks 'shape'"),
    "shape-zero": (_set(["outputs", 0, "shape"], [0, 3]), "$.outputs[0].shape[0] must be >= 1"),
    "shape-huge": (_set(["outputs", 0, "shape"], [2**31]), "$.outputs[0].shape[0] must be <="),
    "shape-string": (_set(["outputs", 0, "shape"], ["B"]), "$.outputs[0].shape[0] must be integer or null"),
    "parity-no-gate": (_set(["parity"], {"max_abs": 0.1}),
                       "$.parity lacks 'atol' or $.parity lacks 'max_rel_error'"),
    "parity-atol-zero": (_set(["parity", "atol"], 0), "$.parity.atol must be > 0"),
    "reference-without-sha": (_without("reference_sha256"), "$ has 'reference' but lacks 'reference_sha256'"),
    "golden-raw-partial": (_set(["golden_raw"], {"index": "a"}), "$.golden_raw lacks 'data'"),
    "files-entry": (_set(["files", 0], {"file": "x.h"}), "$.files[0] lacks 'sha256'"),
    "range-three": (_set(["inputs", 1, "range"], [0, 20, 30]), "$.inputs[1].range must hold at most 2"),
    "range-one": (_set(["inputs", 1, "range"], [0]), "$.inputs[1].range must hold at least 2"),
    "range-float": (_set(["inputs", 1, "range"], [0, 2.5]), "$.inputs[1].range[1] must be integer"),
    "quantization-mode": (_set(["quantization", "mode"], None), "$.quantization.mode must be string"),
    "deployment-list": (_set(["deployment"], []), "$.deployment must be object or null"),
    "not-an-object": (None, "$ must be object"),
}


def _broken(kind):
    change, _ = BROKEN[kind]
    if change is None:
        return []  # a JSON array, not a manifest object
    document = copy.deepcopy(VALID)
    change(document)
    return document


@pytest.mark.fast
def test_a_manifest_as_written_matches():
    assert schema.validate(VALID, schema.manifest_schema()) is None
    schema.check_manifest_schema(VALID)


@pytest.mark.fast
@pytest.mark.parametrize("kind", list(BROKEN))
def test_each_broken_manifest_is_named_where(kind):
    problem = schema.validate(_broken(kind), schema.manifest_schema())
    assert problem is not None and problem.startswith(BROKEN[kind][1]), problem
    with pytest.raises(ManifestError, match="manifest does not match manifest.schema.json: "):
        schema.check_manifest_schema(_broken(kind))


@pytest.mark.fast
def test_schema_and_the_manifest_module_agree_on_the_required_fields():
    assert tuple(schema.manifest_schema()["required"]) == manifests.REQUIRED_FIELDS


@pytest.mark.fast
def test_a_keyword_the_validators_do_not_apply_is_refused():
    with pytest.raises(ValueError, match=r"\['additionalProperties'\] at #/properties/a"):
        schema.check_schema({"type": "object", "properties": {"a": {"additionalProperties": False}}})
    with pytest.raises(ValueError, match=r"\['oneOf'\] at #/\$defs/x/items"):
        schema.check_schema({"$defs": {"x": {"items": {"oneOf": []}}}})


NODE = shutil.which("node")
JS_VALIDATE = """
import { manifestSchema, validate, checkSchema } from './lib/schema.mjs';
const documents = JSON.parse(await new Promise((ok) => {
  let text = ''; process.stdin.on('data', (d) => { text += d; }).on('end', () => ok(text));
}));
const out = documents.map((d) => validate(d, manifestSchema()));
let refused = null;
try { checkSchema({ properties: { a: { additionalProperties: false } } }); }
catch (e) { refused = e.message; }
console.log(JSON.stringify({ out, refused }));
"""


@pytest.mark.fast
@pytest.mark.skipif(NODE is None, reason="node is not installed (make verify-web needs it)")
def test_the_javascript_validator_gives_the_same_verdicts():
    documents = [VALID] + [_broken(kind) for kind in BROKEN]
    done = subprocess.run([NODE, "--input-type=module", "-e", JS_VALIDATE], cwd=os.path.join(REPO, "web"),
                          input=json.dumps(documents), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    python = [schema.validate(d, schema.manifest_schema()) for d in documents]
    # The same verdict at the same place; the quoted values differ (repr vs JSON.stringify).
    assert [p is None for p in answer["out"]] == [p is None for p in python]
    def place(problem):
        return problem.split(" must ")[0].split(" lacks ")[0]

    for js, py in zip(answer["out"][1:], python[1:]):
        assert place(js) == place(py), (js, py)
    assert "additionalProperties" in answer["refused"]


# -- the verifiers apply it to published sets --------------------------------------------------------


@pytest.fixture(scope="module")
def published(artifact_factory, tmp_path_factory):
    out, _ = artifact_factory()
    copy_dir = tmp_path_factory.mktemp("schema-set")
    shutil.copytree(out, copy_dir, dirs_exist_ok=True)
    return str(copy_dir)


def test_every_published_manifest_matches(published):
    for name in sorted(os.listdir(published)):
        if name.endswith((".onnx.json", ".tflite.json", "_savedmodel.json")):
            schema.check_manifest_schema(manifests.read_manifest(os.path.join(published, name)))


def test_both_verifiers_refuse_what_only_the_schema_forbids(published):
    from export.runtime.verify import verify_manifest

    path = os.path.join(published, "xattn_u64_h4_q10x64_kv10x64.onnx.json")
    manifest = manifests.read_manifest(path)
    manifest["quantization"] = {"scheme": "float32"}  # no other check of either verifier looks at it
    manifests.write_manifest(path, manifest)
    result = verify_manifest(path)
    assert result.status == "failed"
    assert result.reason == "manifest does not match manifest.schema.json: $.quantization lacks 'mode'"
    if NODE is None:
        pytest.skip("node is not installed: the JavaScript side is not checked")
    code = ("import { loadArtifact } from './lib/artifacts.mjs';\n"
            f"try {{ loadArtifact({json.dumps(path)}); console.log('loaded'); }}\n"
            "catch (e) { console.log(e.constructor.name + ': ' + e.message); }\n")
    done = subprocess.run([NODE, "--input-type=module", "-e", code], cwd=os.path.join(REPO, "web"),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == ("ArtifactError: manifest does not match manifest.schema.json: "
                                   "$.quantization lacks 'mode'"), done.stdout + done.stderr
