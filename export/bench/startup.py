"""End-to-end start-up: `python -m export.onnx` against a bare Keras export script, in fresh processes."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

from export.errors import ExportError

log = logging.getLogger("export")


def measure_startup(args, workdir: str) -> dict:
    """Wall time of `python -m export.onnx --units U --heads H` (convert + verify + publish)
    against a bare script that imports TensorFlow and calls model.export(format="onnx"),
    in alternating fresh processes (like hyperfine), after one untimed run of each."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)  # neither command runs pinned
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bare_keras_export.py")
    sizes = [str(v) for v in (args.units, args.heads, args.query_len, args.query_features,
                              args.kv_len, args.kv_features)]
    ours_cmd = [sys.executable, "-m", "export.onnx", "--units", str(args.units), "--heads",
                str(args.heads), "--quiet"]
    commands = {
        "ours": lambda out: ours_cmd + ["--output-dir", out],
        "keras": lambda out: [sys.executable, script, out, *sizes],
    }
    times: dict[str, list[float]] = {"ours": [], "keras": []}
    for i in range(args.startup_runs + 1):
        for key in (("ours", "keras") if i % 2 == 0 else ("keras", "ours")):
            out = tempfile.mkdtemp(prefix=f"startup-{key}-", dir=workdir)
            t0 = time.perf_counter()
            done = subprocess.run(commands[key](out), cwd=repo, env=env, capture_output=True,
                                  text=True)
            elapsed = time.perf_counter() - t0
            if done.returncode != 0:
                raise ExportError(f"startup run of {key} failed ({done.returncode}): "
                                  f"{done.stderr.strip()[-500:]}")
            if i > 0:  # the first run of each warms the file cache
                times[key].append(elapsed)
    result = {"command": " ".join(["python"] + ours_cmd[1:]),
              "baseline": "python <script>: import tensorflow, build the model, "
                          "model.export(format='onnx')"}
    for key, values in times.items():
        result[key] = {"median_s": statistics.median(values), "mean_s": statistics.fmean(values),
                       "sd_s": statistics.stdev(values) if len(values) > 1 else 0.0,
                       "min_s": min(values), "runs": len(values)}
    result["ratio"] = result["ours"]["median_s"] / result["keras"]["median_s"]
    return result
