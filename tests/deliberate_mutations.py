"""The deliberate mutations of issue 17, each applied to a fresh copy of HEAD (git archive), and the
tests each one fails. Not collected by pytest (no test_ prefix); run it by hand:

    python tests/deliberate_mutations.py [NAME ...]     # NAME: a key of MUTATIONS; none: all
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONNX_CHECK = "    try:\n        onnx.checker.check_model(path, full_check=True)"
TFLITE_CHECK = "    try:\n        ops = tflite_op_names(path)"
PUBLISHED = "        published.append(dst)\n"
# name -> ([(file, text, replacement)], pytest arguments)
MUTATIONS = {
    "graph-checks-off": ([
        ("export/onnx/check.py", ONNX_CHECK, "    return\n" + ONNX_CHECK),
        ("export/tflite/check.py", TFLITE_CHECK, "    return\n" + TFLITE_CHECK),
    ], ["tests/test_graph_checks.py"]),
    "manifests-first": ([
        ("export/pipeline.py", "staged + artifacts + signatures + manifests",
         "manifests + staged + artifacts + signatures"),
    ], ["tests/test_publish_order.py"]),
    "fsync-dropped": ([
        ("export/publish.py", PUBLISHED + "    _fsync_dir(output_dir)\n", PUBLISHED),
    ], ["tests/test_publish_order.py"]),
    "allow-pickle": ([
        ("export/calibration.py", "np.load(path, allow_pickle=False)", "np.load(path, allow_pickle=True)"),
    ], ["tests/test_quantize.py", "-k", "pickle"]),
    "int8-gate-5": ([
        ("export/runtime/check.py", '"int8": 5e-2}', '"int8": 5.0}'),
    ], ["tests/test_quantize.py", "-k", "default_gate"]),
}


def main(names: list[str]) -> None:
    for name in names or MUTATIONS:
        edits, tests = MUTATIONS[name]
        copy = os.path.join(tempfile.gettempdir(), f"xattn-mutation-{name}")
        shutil.rmtree(copy, ignore_errors=True)
        os.makedirs(copy)
        subprocess.run(f"git -C {REPO} archive HEAD | tar -x -C {copy}", shell=True, check=True)
        for path, old, new in edits:
            with open(os.path.join(copy, path), encoding="utf-8") as f:
                text = f.read()
            assert text.count(old) == 1, (name, path, "the code moved: update MUTATIONS")
            with open(os.path.join(copy, path), "w", encoding="utf-8") as f:
                f.write(text.replace(old, new))
        print(f"=== {name}: {', '.join(p for p, _, _ in edits)}; pytest {' '.join(tests)}", flush=True)
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=copy, env={**os.environ, "PYTHONPATH": copy}, capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if line.startswith("FAILED") or " passed" in line or " failed" in line:
                print("   ", line.split(" - ")[0], flush=True)
        shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
