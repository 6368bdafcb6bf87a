"""onnxruntime writes an ONNX file in the ORT format, the same bytes on every run.

What `onnxruntime.tools.convert_onnx_models_to_ort` does for one file (a session saving its graph
with `session.save_model_format=ORT`), at the basic optimization level: constant folding and
redundant-node removal, no fusions into contrib ops (FusedMatMul, ...) that NNAPI and CoreML do
not take, and no x86-specific layouts.

onnxruntime orders parts of the flatbuffer by hashes of addresses (absl's hash seed is an
address), so the same graph gives other bytes in every process, and even twice in one. The
serialization therefore runs in a child whose addresses repeat: address space randomization off
(personality(2)), an isolated interpreter (`-I`), a fixed environment, and fixed relative file
names in the scratch folder, so that nothing the child allocates depends on where it runs.
Nor on Python's bytecode caches: a child that compiled onnxruntime's and numpy's modules from
source (a fresh clone's first build) wrote other bytes than one that read their `.pyc` files, so
the child reads none and writes none (`-B`, and `-X pycache_prefix=` an empty folder of its own).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# The child's whole program: onnxruntime only, names relative to its working directory.
CHILD_SOURCE = """
import onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.optimized_model_filepath = "model.ort"
options.log_severity_level = 3
options.add_session_config_entry("session.save_model_format", "ORT")
ort.InferenceSession("model.onnx", options, providers=["CPUExecutionProvider"])
"""
_ADDR_NO_RANDOMIZE = 0x0040000  # personality(2) flag
# A launcher: turns address space randomization off for itself, then becomes the child (the
# personality survives exec). Not a `preexec_fn`: code run between fork and exec in a parent that
# holds threads (TensorFlow's, gRPC's: an export inside a server) can meet their locks and fork
# handlers mid-way; a fresh interpreter holds none. Where the kernel refuses (not Linux, a seccomp
# profile), the file is still right, only not byte-reproducible.
LAUNCHER_SOURCE = f"""
import ctypes, os, platform, sys
if platform.system() == "Linux":
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        current = libc.personality(0xFFFFFFFF)
        if current != -1:
            libc.personality(current | {_ADDR_NO_RANDOMIZE:#x})
    except (OSError, AttributeError):
        pass
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def serialize_ort(src: str, dst: str, scratch: str) -> subprocess.CompletedProcess:
    """Write `src` (ONNX) as `dst` (ORT) through a child process working in `scratch`."""
    shutil.copyfile(src, os.path.join(scratch, "model.onnx"))
    # Bytecode is looked up under this (empty) folder only, so every run compiles from source.
    os.makedirs(os.path.join(scratch, "no-pycache"), exist_ok=True)
    child = ["-I", "-B", "-X", "pycache_prefix=no-pycache", "-c", CHILD_SOURCE]
    done = subprocess.run(
        [sys.executable, *child[:4], "-c", LAUNCHER_SOURCE, *child],
        cwd=scratch, env={"LC_ALL": "C"}, capture_output=True, text=True,
    )
    if done.returncode == 0:
        os.replace(os.path.join(scratch, "model.ort"), dst)
    return done
