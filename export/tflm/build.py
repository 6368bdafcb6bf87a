"""The TFLM builder: the full-int8 TFLite file, its smallest tensor arena, and its C++.

The file is the TFLite builder's full-int8 one (`export.tflite.build`, the same calibration);
what a microcontroller needs on top is measured and generated here: the ops (each must have a
TFLM kernel), the smallest tensor arena TFLM runs it in (bisection), the flash it takes, and the
C++ sources that embed it (`export.tflm.cpp`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

from export.errors import ArenaError, SpecError
from export.formats import Built
from export.publish import sha256_path, versions
from export.spec import ArtifactSpec
from export.tflite.build import build_tflite
from export.tflm.check import check_tflm_ops
from export.tflm.cpp import c_identifier, file_names, write_cpp
from export.tflm.runtime import smallest_arena

log = logging.getLogger("export")

SUFFIX = ".tflm.tflite"
# The RAM of the microcontroller class the README and the example judge against.
REFERENCE_RAM_BYTES = 256 * 1024


def build_tflm(spec, fn, workdir: str, *, calibration=None, metadata: dict | None = None,
               arena_limit: int | None = None) -> Built:
    """Convert `fn` into a full-int8 `.tflm.tflite` file under `workdir`, with its C++ beside it.

    Args:
        spec: the artifact's shapes, names and variant (`int8`), one length, a fixed batch.
        fn: the inference function. workdir: where the file and its C++ are written.
        calibration: the int8 calibration (export.calibration), as for TFLite int8.
        metadata: the facts written inside the file (export.runtime.metadata).
        arena_limit: the largest tensor arena allowed, in bytes; None: no limit.

    Returns:
        `Built(path, facts, companions=the three C++ files, deployment={arena_bytes, ...})`.

    Raises:
        SpecError: not int8, or several lengths. ConversionError: the TFLite converter failed, or
        an op has no TFLM kernel (every such op named). ArenaError: the smallest arena is larger
        than `arena_limit`, or TFLM does not run the file at all.
    """
    if spec.quantize != "int8":
        raise SpecError(f"TFLM artifacts are full-int8 (integer kernels). "
                        f"Received: quantize={spec.quantize!r}")
    if isinstance(spec, ArtifactSpec) and (spec.lengths or spec.dynamic_lengths):
        raise SpecError("TFLM artifacts have one static length (TFLM runs one subgraph); export one "
                        "file per length with --query-len/--kv-len")
    scratch = tempfile.mkdtemp(prefix=".tflm-src-", dir=workdir)
    try:
        built = build_tflite(spec, fn, scratch, calibration=calibration, metadata=metadata)
        path = os.path.join(workdir, spec.artifact_name("tflm"))
        os.replace(built.path, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        data = f.read()
    ops = check_tflm_ops(data, name)
    found = smallest_arena(data)
    arena = found["arena_bytes"]
    log.debug("tflm     %s runs in %d bytes (%d tries)", name, arena, found["search"]["tries"])
    if arena_limit is not None and arena > arena_limit:
        raise ArenaError(f"{name} needs a {arena:,}-byte tensor arena (the smallest TFLM runs it "
                         f"in); --arena-limit is {arena_limit:,} bytes")
    stem = name[: -len(SUFFIX)]
    companions = write_cpp(workdir, stem, data, ops, artifact=name, sha256=sha256_path(path),
                           arena_bytes=arena)
    deployment = {
        "runtime": f"tflite-micro {versions().get('tflite-micro', '?')}",
        "arena_bytes": arena,
        "arena_search": {**found["search"], "runs": "allocate; the answer also invoked on zero inputs"},
        "flash_bytes": len(data),
        "ops": sorted(ops),
        "op_resolver": f"tflite::MicroMutableOpResolver<{len(ops)}>",
        "symbol_prefix": c_identifier(stem),
        "fits_256k_ram": arena <= REFERENCE_RAM_BYTES,
        "files": dict(zip(("model_data_h", "model_data_cc", "op_resolver_h"), file_names(stem))),
    }
    if arena_limit is not None:
        deployment["arena_limit"] = arena_limit
    return Built(path, built.facts, companions=tuple(companions), deployment=deployment)

