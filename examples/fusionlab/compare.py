"""`python -m examples.fusionlab.compare DIR INPUTS.npz OUTPUTS.npz`: every published float32 file
in DIR run in its own runtime on INPUTS, against the outputs fusionlab-learn itself gave for them
(OUTPUTS, written in fusionlab's TF 2.15 environment: tests/fixtures/fusionlab/make_fixtures.py).

One line per file: the max abs difference and the gate `1e-4 * max(1, max|y|)` (the float32 gate
`python -m export` applies against its Keras reference); exit 1 when any file is over it. Needs
numpy and the runtimes only (SavedModel where TensorFlow is importable).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ATOL = 1e-4


def compare(folder: str, inputs: str, outputs: str) -> list[dict]:
    """[{artifact, format, rows, max_abs_diff, gate, ok}] for each float32 manifest in `folder`."""
    from export import runtimes

    with np.load(inputs) as x, np.load(outputs) as y:
        feeds = {k: x[k] for k in x.files}
        expected = {k: y[k] for k in y.files}
    scale = max(1.0, max(float(np.abs(v).max()) for v in expected.values()))
    results = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "artifact" not in manifest or "format" not in manifest:
            continue  # golden-vector descriptions and other files
        if manifest.get("quantization", {}).get("mode", "none") != "none":
            continue
        fmt = manifest["format"]
        if not runtimes.runtime_available(fmt):
            continue
        runner = runtimes.load_runner(fmt, os.path.join(folder, manifest["artifact"]),
                                      batch=manifest["inputs"][0]["shape"][0],
                                      inputs=manifest["inputs"])
        got = runner.run({i["name"]: feeds[i["name"]] for i in manifest["inputs"]})
        diff = max(float(np.max(np.abs(got[k].reshape(v.shape) - v))) for k, v in expected.items())
        results.append({"artifact": manifest["artifact"], "format": fmt,
                        "rows": len(next(iter(feeds.values()))), "max_abs_diff": diff,
                        "gate": ATOL * scale, "ok": diff <= ATOL * scale})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.fusionlab.compare",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an output folder of python -m export")
    parser.add_argument("inputs", help="the inputs fusionlab was run on (.npz, one array per input)")
    parser.add_argument("outputs", help="fusionlab's outputs for them (.npz, one array per output)")
    args = parser.parse_args(argv)
    results = compare(args.folder, args.inputs, args.outputs)
    if not results:
        print(f"no float32 artifact to compare in {args.folder}", file=sys.stderr)
        return 2
    for r in results:
        mark = "✓" if r["ok"] else "✗"
        print(f"{mark} {r['artifact']:<28} {r['format']:<10} max abs diff {r['max_abs_diff']:.2e} "
              f"<= {r['gate']:.0e} vs fusionlab's outputs ({r['rows']} rows)")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
