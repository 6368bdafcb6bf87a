"""The Python examples of the README and the docs pages run as written (paths pointed at freshly
built artifacts), and every Python or JS block on those pages is run by a named test."""

from __future__ import annotations

import os

import numpy as np
from doc_pages import REPO, block, blocks

PADDED_EXAMPLE = os.path.join(REPO, "docs", "examples", "tflite_padded_batch.py")

# What each runnable block holds -> the test that runs it. A new Python or JS block on any page
# needs a line here, and a test.
TESTED_BLOCKS = {
    "python": {
        "CrossAttention(units=64": "tests/test_readme.py::test_layer_example_runs",
        "providers=[\"CPUExecutionProvider\"]":
            "tests/test_readme.py::test_running_the_files_example_runs",
        "def pad(": "tests/test_masks.py::test_readme_example_runs (docs/examples/tflite_padded_batch.py)",
        "get_modelmeta": "tests/test_edge.py::test_readme_metadata_example_runs",
        "tritonclient.http as httpclient": "tests/test_serve.py::test_readme_example_runs",
        "BucketedRunner(": "tests/test_buckets.py::test_docs_bucketed_runner_example_runs",
        # Runs in fusionlab-learn's own environment (TF 2.15): checked to be the fixture script's code.
        "def serving_module(":
            "tests/test_fusionlab.py::test_docs_saved_model_snippet_is_the_fixture_scripts",
        "cross_attention_weights.npz": "tests/test_fusionlab.py::test_docs_weights_example_runs",
    },
    "js": {"onnxruntime-web": "web/test/readme.test.mjs"},
}


def test_every_python_and_js_block_is_run_by_a_test():
    for lang, needles in TESTED_BLOCKS.items():
        found = blocks(lang)
        assert found, f"no {lang} block on any page"
        for page, code in found:
            claimed = [n for n in needles if n in code]
            assert len(claimed) == 1, f"a {lang} block on {page} is run by {len(claimed)} tests:\n{code}"
        for needle in needles:
            assert any(needle in code for _, code in found), f"no {lang} block holds {needle!r}"


def test_layer_example_runs():
    """The example's values are fusionlab's (tests/test_layer.py's replica, same weights), and
    stay so with every weight random and non-zero (Keras's zero biases would hide a lost bias)."""
    from test_layer import Fusionlab

    code = block("python", "CrossAttention(units=64")
    scope: dict = {}
    exec(compile(code, "docs (layer example)", "exec"), scope)
    assert tuple(scope["out"].shape) == (32, 10, 64)
    assert tuple(scope["scores"].shape) == (32, 4, 10, 12)
    layer, inputs = scope["layer"], [scope["source1"], scope["source2"]]
    reference = Fusionlab.CrossAttention(64, 4)
    reference(inputs)
    reference.set_weights(layer.get_weights())
    # value_mask all True: the reference's attention mask is all True too.
    mask = np.ones((32, 10, 12), bool)
    want, want_scores = reference(inputs, attention_mask=mask, use_causal_mask=True,
                                  return_attention_scores=True)
    np.testing.assert_allclose(np.asarray(scope["out"]), np.asarray(want), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scope["scores"]), np.asarray(want_scores), rtol=0, atol=1e-6)
    scores = np.asarray(scope["scores"])
    above = np.triu(np.ones((10, 12), bool), 1)
    assert np.all(scores[:, :, above] == 0) and np.allclose(scores.sum(-1), 1.0, atol=1e-5)

    rng = np.random.default_rng(17)
    weights = [0.1 * rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()]
    layer.set_weights(weights)
    reference.set_weights(weights)
    np.testing.assert_allclose(np.asarray(layer(inputs)), np.asarray(reference(inputs)), rtol=1e-5, atol=1e-5)
    out = layer(inputs, value_mask=np.ones((32, 12), bool), use_causal_mask=True)
    want = reference(inputs, attention_mask=mask, use_causal_mask=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def _assert_printed_as_shown(printed: str, shown: str, atol: float) -> None:
    """Line by line, word by word: numbers within atol (another CPU rounds its own way), the
    rest exactly."""
    printed_lines, shown_lines = printed.strip().splitlines(), shown.strip().splitlines()
    assert len(printed_lines) == len(shown_lines), (printed, shown)
    for got, want in zip(printed_lines, shown_lines):
        assert len(got.split()) == len(want.split()), (got, want)
        for g, w in zip(got.split(), want.split()):
            try:
                assert abs(float(g) - float(w)) <= atol, (got, want)
            except ValueError:
                assert g == w, (got, want)


def test_running_the_files_example_runs(artifact_factory, capsys):
    """It runs as written on the default artifacts and prints what the page shows after it."""
    out_dir, _ = artifact_factory(formats=("tflite", "onnx"))
    code = block("python", 'providers=["CPUExecutionProvider"]')
    scope: dict = {}
    code = code.replace('"artifacts/', f'"{out_dir}/')
    capsys.readouterr()
    exec(compile(code, "docs (running the files)", "exec"), scope)
    _assert_printed_as_shown(capsys.readouterr().out, block("text", "tflite (1, 10, 64) float32"),
                             atol=2e-3)
    assert scope["output"].shape == (1, 10, 64)
    # Both files give the published Keras reference's values on the example's inputs.
    import keras

    from export.spec import ArtifactSpec

    model = keras.saving.load_model(os.path.join(out_dir, ArtifactSpec().reference_name))
    feeds = {"source1": scope["source1"], "source2": scope["source2"]}
    expected = np.asarray(model(feeds, training=False)["output"])
    assert np.std(expected) > 1e-2
    np.testing.assert_allclose(scope["output"], expected, rtol=0, atol=1e-4)  # LiteRT's, last
    (onnx_output,) = scope["session"].run(["output"], feeds)
    np.testing.assert_allclose(onnx_output, expected, rtol=0, atol=1e-4)


def test_padded_batch_example_is_the_tested_file():
    """tests/test_masks.py runs docs/examples/tflite_padded_batch.py; the docs show its code."""
    with open(PADDED_EXAMPLE, encoding="utf-8") as f:
        example = f.read()
    assert block("python", "def pad(").strip() in example
