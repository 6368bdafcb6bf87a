"""The documentation's Python examples run as written (paths pointed at freshly built artifacts)."""

from __future__ import annotations

import os

import doc_commands
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
PADDED_EXAMPLE = os.path.join(REPO, "docs", "examples", "tflite_padded_batch.py")


def python_blocks() -> list[str]:
    """The ```python blocks of README.md and docs/**/*.md (tests/doc_commands.py), each once."""
    return list(dict.fromkeys(doc_commands.python_blocks()))


def test_layer_example_runs():
    """The example's values are fusionlab's (tests/test_layer.py's replica, same weights), and
    stay so with every weight random and non-zero (Keras's zero biases would hide a lost bias)."""
    from test_layer import Fusionlab

    (block,) = [b for b in python_blocks() if "CrossAttention(units=64" in b]
    scope: dict = {}
    exec(compile(block, "README.md (layer example)", "exec"), scope)
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


def test_running_the_files_example_runs(artifact_factory):
    out_dir, _ = artifact_factory(formats=("tflite", "onnx"))
    (block,) = [b for b in python_blocks() if "InferenceSession" in b and "get_modelmeta" not in b]
    scope: dict = {}
    code = block.replace('"artifacts/', f'"{out_dir}/')
    exec(compile(code, "README.md (running the files)", "exec"), scope)
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
    """tests/test_masks.py runs docs/examples/tflite_padded_batch.py; the README shows its code."""
    (block,) = [b for b in python_blocks() if "def pad(" in b]
    with open(PADDED_EXAMPLE, encoding="utf-8") as f:
        example = f.read()
    assert block.strip() in example
