"""Published files against outputs computed elsewhere (fusionlab-learn's own, under TF 2.15).

    python -m examples.fusionlab_parity FOLDER INPUTS.npz OUTPUTS.npz [--name STEM]

Runs every artifact whose manifest is in FOLDER on all rows of INPUTS.npz, the way export.verify
and export.serve run it (a stateful TFLite file reset before each call), and prints its max abs
diff from OUTPUTS.npz, as a fraction of their scale (max |y|) too. A TFLite file that keeps state
is also run on a plain LiteRT interpreter without the reset, to show what a device that skips
it gets. Exit 1 if a file is beyond 1e-4 of the scale. numpy and the runtimes only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from export import runtimes

GATE = 1e-4  # of the outputs' scale


def _npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def _without_reset(path: str, feeds: dict) -> dict[str, np.ndarray]:
    """One row per invoke() on one interpreter, never reset: what a naive device loop gets."""
    interpreter = runtimes.tflite_interpreter(path)
    runner = interpreter.get_signature_runner("serving_default")
    rows = len(next(iter(feeds.values())))
    outs = [runner(**{k: v[i:i + 1] for k, v in feeds.items()}) for i in range(rows)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.fusionlab_parity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("inputs")
    parser.add_argument("outputs")
    parser.add_argument("--name", default="", help="only artifacts whose name starts with this")
    args = parser.parse_args(argv)
    feeds, want = _npz(args.inputs), _npz(args.outputs)
    scale = max(float(np.max(np.abs(v))) for v in want.values())
    rows = len(next(iter(feeds.values())))
    failed = 0
    for path in sorted(glob.glob(os.path.join(args.folder, f"{args.name}*.json"))):
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "artifact" not in manifest:
            continue  # golden vectors' index
        artifact = os.path.join(args.folder, manifest["artifact"])
        runner = runtimes.load_runner(manifest["format"], artifact,
                                      batch=manifest["inputs"][0]["shape"][0],
                                      inputs=manifest["inputs"])
        got = runner.run({t["name"]: feeds[t["name"]] for t in manifest["inputs"]})
        diff = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
        ok = diff <= GATE * scale
        failed += not ok
        print(f"{'✓' if ok else '✗'} {manifest['artifact']:<24} max abs diff {diff:.2e} "
              f"({diff / scale:.1e} of the scale {scale:.3g}) on {rows} rows")
        if (manifest.get("state") or {}).get("stateful"):
            plain = _without_reset(artifact, feeds)
            drift = max(float(np.max(np.abs(plain[k] - want[k]))) for k in want)
            print(f"  without {manifest['state']['reset']}: max abs diff {drift:.2e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
