"""Parity against the reference: the metrics, the default gates, and the one pass/fail rule.

numpy only: the pipeline gates an artifact with `gate` before publishing it, and `export.runtime.verify`
applies the same `gate` to the golden vectors on the device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from export.errors import ParityError
from export.formats import get_format

# Default relative L2 gates per quantization variant (float32 gates per format: export.formats).
# int8-cpu is gated like int8: the same calibrated projections, the attention core in float.
DEFAULT_MAX_REL = {"float16": 1e-3, "dynamic-int8": 2.5e-2, "int8": 5e-2, "int8-cpu": 5e-2}

def parity_metrics(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> dict:
    """max_abs, mean_abs, rmse, rel_l2 (||y - y^|| / ||y||) and cosine over every output."""
    missing = sorted(set(reference) - set(outputs))
    if missing:
        raise ParityError(f"outputs {missing} missing; the artifact returned {sorted(outputs)}")
    refs, gots = [], []
    for name in sorted(reference):
        ref = np.asarray(reference[name], dtype=np.float64)
        got = np.asarray(outputs[name], dtype=np.float64)
        if ref.shape != got.shape:
            raise ParityError(
                f"output {name!r} has shape {got.shape}, the reference {ref.shape}"
            )
        refs.append(ref.ravel())
        gots.append(got.ravel())
    y, y_hat = np.concatenate(refs), np.concatenate(gots)
    n_bad = int(np.count_nonzero(~np.isfinite(y_hat)))
    if n_bad:
        raise ParityError(f"the artifact returned {n_bad} NaN/inf values (of {y_hat.size})")
    diff = y - y_hat
    norm_y, norm_hat = float(np.linalg.norm(y)), float(np.linalg.norm(y_hat))
    return {
        "max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0,
        "mean_abs": float(np.mean(np.abs(diff))) if diff.size else 0.0,
        "rmse": float(np.sqrt(np.mean(diff * diff))) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / norm_y) if norm_y else float(np.linalg.norm(diff)),
        "cosine": float(y @ y_hat / (norm_y * norm_hat)) if norm_y and norm_hat else 1.0,
    }


def tolerance(fmt: str, quantize: str, *, atol: float | None = None,
              max_rel: float | None = None) -> dict:
    """The gate of an artifact: {"atol": x} for float32, {"max_rel_error": x} for a variant.

    float32 gates on the max abs diff; a variant on the relative L2 error (its max abs diff grows
    with the output's scale, its relative error does not). None takes the default.
    """
    if quantize == "none":
        return {"atol": atol if atol is not None else get_format(fmt).atol}
    return {"max_rel_error": max_rel if max_rel is not None else DEFAULT_MAX_REL[quantize]}


def gate(metrics: dict, *, artifact: str, atol: float | None = None,
         max_rel_error: float | None = None) -> None:
    """Raise ParityError when `max_abs > atol` or `rel_l2 > max_rel_error` (whichever is set).

    The one pass/fail rule: the pipeline applies it before publishing, `export.runtime.verify` after.
    """
    if atol is not None and not metrics["max_abs"] <= atol:
        raise ParityError(
            f"{artifact}: max abs diff {metrics['max_abs']:.3g} exceeds atol={atol:g} "
            f"(rel L2 {metrics['rel_l2']:.3g})"
        )
    if max_rel_error is not None and not metrics["rel_l2"] <= max_rel_error:
        raise ParityError(
            f"{artifact}: relative L2 error {metrics['rel_l2']:.3g} exceeds max_rel_error="
            f"{max_rel_error:g} (max abs diff {metrics['max_abs']:.3g})"
        )
