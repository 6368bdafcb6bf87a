"""The one pass/fail rule (export.runtime.check): the metrics, the default gates and `gate`, on their own
(the fast tier); the pipeline applies them before publishing and export.runtime.verify on the device."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.errors import ParityError
from export.formats import REGISTRY
from export.runtime.check import DEFAULT_MAX_REL, gate, parity_metrics, tolerance

pytestmark = pytest.mark.fast

REF = {"output": np.array([[3.0, 4.0]], np.float32), "scores": np.array([0.0], np.float32)}


def test_metrics_of_a_known_difference():
    got = {"output": np.array([[3.0, 4.5]], np.float32), "scores": np.array([0.0], np.float32)}
    m = parity_metrics(REF, got)
    assert m["max_abs"] == pytest.approx(0.5)
    assert m["mean_abs"] == pytest.approx(0.5 / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(0.25 / 3))
    assert m["rel_l2"] == pytest.approx(0.5 / 5)  # ||(0, .5, 0)|| / ||(3, 4, 0)||
    assert m["cosine"] == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))
    same = parity_metrics(REF, REF)
    assert same["max_abs"] == 0 and same["rel_l2"] == 0 and same["cosine"] == pytest.approx(1)


def test_metrics_of_a_zero_reference_are_absolute():
    zero = {"output": np.zeros((2,), np.float32)}
    m = parity_metrics(zero, {"output": np.array([0.0, 0.2], np.float32)})
    assert m["rel_l2"] == pytest.approx(0.2) and m["cosine"] == 1.0


@pytest.mark.parametrize("got, words", [
    ({"output": REF["output"]}, "outputs ['scores'] missing; the artifact returned ['output']"),
    ({**REF, "output": np.zeros((2, 1), np.float32)},
     "output 'output' has shape (2, 1), the reference (1, 2)"),
    ({**REF, "output": np.array([[np.nan, np.inf]], np.float32)}, "returned 2 NaN/inf values (of 3)"),
], ids=["missing", "shape", "nan"])
def test_outputs_that_cannot_be_compared(got, words):
    with pytest.raises(ParityError) as info:
        parity_metrics(REF, got)
    assert words in str(info.value), str(info.value)


def test_default_gates_come_from_the_registry_and_the_variants():
    for fmt in REGISTRY.values():
        assert tolerance(fmt.name, "none") == {"atol": fmt.atol}
    assert tolerance("onnx", "none", atol=1e-3) == {"atol": 1e-3}
    for mode, default in DEFAULT_MAX_REL.items():
        assert tolerance("tflite", mode) == {"max_rel_error": default}
    assert tolerance("tflite", "int8", max_rel=0.1) == {"max_rel_error": 0.1}


def test_gate_is_inclusive_and_names_what_failed():
    metrics = {"max_abs": 1e-4, "rel_l2": 2e-2}
    gate(metrics, artifact="a", atol=1e-4)  # equal passes
    gate(metrics, artifact="a", max_rel_error=2e-2)
    with pytest.raises(ParityError, match=r"^a: max abs diff 0.0001 exceeds atol=5e-05 \(rel L2 0.02\)$"):
        gate(metrics, artifact="a", atol=5e-5)
    with pytest.raises(ParityError, match=r"^b: relative L2 error 0.02 exceeds max_rel_error=0.01"):
        gate(metrics, artifact="b", max_rel_error=1e-2)


def test_gate_fails_closed_on_nan_metrics():
    with pytest.raises(ParityError, match="exceeds atol"):
        gate({"max_abs": float("nan"), "rel_l2": 0.0}, artifact="a", atol=1.0)
    with pytest.raises(ParityError, match="exceeds max_rel_error"):
        gate({"max_abs": 0.0, "rel_l2": float("nan")}, artifact="a", max_rel_error=1.0)
