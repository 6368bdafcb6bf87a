"""`python -m examples.fusionlab.compare DIR INPUTS.npz OUTPUTS.npz`: every published float32 file
in DIR run in its own runtime on INPUTS, against the outputs fusionlab-learn itself gave for them
(OUTPUTS, written in fusionlab's TF 2.15 environment: tests/fixtures/fusionlab/make_fixtures.py).

One line per file: the max abs difference, as a fraction of the outputs' scale (max |y|) too, and
the gate `1e-4 * scale`; exit 1 when any file is over it. Files run the way export.runtime.verify and
export.runtime.serve run them (a stateful TFLite file reset before each call); such a file is also run on
a plain LiteRT interpreter without the reset, one row per invoke(), to show what a device that
skips it gets. Needs numpy and the runtimes only (SavedModel where TensorFlow is importable).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

GATE = 1e-4  # of the outputs' scale


def _npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _without_reset(path: str, feeds: dict) -> dict[str, np.ndarray]:
    """One row per invoke() on one interpreter, never reset: what a naive device loop gets."""
    from export.runtime import runtimes

    interpreter = runtimes.tflite_interpreter(path)
    runner = interpreter.get_signature_runner("serving_default")
    rows = len(next(iter(feeds.values())))
    outs = [runner(**{k: v[i:i + 1] for k, v in feeds.items()}) for i in range(rows)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def _max_diff(got: dict, expected: dict) -> float:
    return max(float(np.max(np.abs(got[k].reshape(v.shape) - v))) for k, v in expected.items())


def compare(folder: str, inputs: str, outputs: str, *, name: str = "") -> list[dict]:
    """[{artifact, format, rows, max_abs_diff, scale, gate, ok, without_reset}] for each float32
    manifest in `folder` (whose artifact name starts with `name`)."""
    from export.runtime import runtimes

    feeds, expected = _npz(inputs), _npz(outputs)
    scale = max(float(np.abs(v).max()) for v in expected.values())
    results = []
    for path in sorted(glob.glob(os.path.join(folder, f"{glob.escape(name)}*.json"))):
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "artifact" not in manifest or "format" not in manifest:
            continue  # golden-vector descriptions and other files
        if manifest.get("quantization", {}).get("mode", "none") != "none":
            continue
        fmt = manifest["format"]
        if not runtimes.runtime_available(fmt):
            continue
        artifact = os.path.join(folder, manifest["artifact"])
        runner = runtimes.load_runner(fmt, artifact, batch=manifest["inputs"][0]["shape"][0],
                                      inputs=manifest["inputs"])
        got = runner.run({i["name"]: feeds[i["name"]] for i in manifest["inputs"]})
        diff = _max_diff(got, expected)
        state = manifest.get("state") or {}
        results.append({
            "artifact": manifest["artifact"], "format": fmt,
            "rows": len(next(iter(feeds.values()))), "max_abs_diff": diff, "scale": scale,
            "gate": GATE * scale, "ok": diff <= GATE * scale,
            "without_reset": (_max_diff(_without_reset(artifact, feeds), expected)
                              if state.get("stateful") else None),
            "reset": state.get("reset"),
        })
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.fusionlab.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an output folder of python -m export")
    parser.add_argument("inputs", help="the inputs fusionlab was run on (.npz, one array per input)")
    parser.add_argument("outputs", help="fusionlab's outputs for them (.npz, one array per output)")
    parser.add_argument("--name", default="", help="only artifacts whose name starts with this")
    args = parser.parse_args(argv)
    results = compare(args.folder, args.inputs, args.outputs, name=args.name)
    if not results:
        print(f"no float32 artifact to compare in {args.folder}", file=sys.stderr)
        return 2
    for r in results:
        mark = "✓" if r["ok"] else "✗"
        print(f"{mark} {r['artifact']:<28} {r['format']:<10} max abs diff {r['max_abs_diff']:.2e} "
              f"({r['max_abs_diff'] / r['scale']:.1e} of the scale {r['scale']:.3g}) <= "
              f"{r['gate']:.1e} vs fusionlab's outputs ({r['rows']} rows)")
        if r["without_reset"] is not None:
            print(f"  without {r['reset']}: max abs diff {r['without_reset']:.2e}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
