"""`python -m export.bench`: pins BLAS to one thread, then runs the benchmark."""

import os
import sys

# The SGEMM peak is measured single-thread (as the comparison defines it): pin BLAS before numpy
# loads, which is why nothing above this line imports it. Only when run as a program: importing
# export.bench changes no environment.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
_BLAS_PINNED = "numpy" not in sys.modules and os.environ.get("OPENBLAS_NUM_THREADS") == "1"

from export.bench.cli import main  # noqa: E402  (after pinning BLAS; TensorFlow after parsing)
from export.reporting import exit_with  # noqa: E402

if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        # The serving benchmark (export.runtime.serve.loadbench): Ray Serve against in-process runs.
        from export.runtime.serve.loadbench import main as serve_main  # lazy: Ray, only for this job

        exit_with(serve_main(sys.argv[2:], prog="python -m export.bench serve"))
    exit_with(main(blas_pinned=_BLAS_PINNED))
