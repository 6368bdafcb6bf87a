"""What an export needs from the machine: memory (estimated before building), a writable
`--output-dir`, and the OS errors that end an export, each turned into a typed one-line error.

No TensorFlow here: the estimate is arithmetic on the spec; TensorFlow's ResourceExhaustedError
is recognised by name.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping

from export.buckets import DYNAMIC_CHECK_LENGTHS
from export.errors import (
    ConversionError,
    DiskFullError,
    ExportError,
    OutOfMemoryError,
    OutputDirError,
    first_line,
    one_line,
)

log = logging.getLogger("export")

# Measured peak RSS of `python -m export` (all three formats) on this project's machines
# (README "Trust"): 0.77 GB for a tiny layer (TensorFlow, tf2onnx, both runtimes imported), then
# about WEIGHT_COPIES bytes per float32 weight byte (float64 draw, Keras variables, folded
# matrices, the traced graph's constants, tf2onnx's and the TFLite converter's copies, each
# runtime's session) and ACTIVATION_COPIES per byte of the largest batch's activations (the
# reference and each runtime hold scores, softmax and projections at once).
BASE_BYTES = 800 << 20
WEIGHT_COPIES = 6
ACTIVATION_COPIES = 6


def _gib(n: float) -> str:
    if n >= 1 << 40:
        return f"{n / (1 << 40):,.0f} TiB"
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.0f} MiB"


def estimate_bytes(specs: Mapping[str, object], parameters: int | None = None) -> int:
    """Peak memory an export of `specs` (format -> ArtifactSpec) needs, in bytes.

    For a whole model (ModelSpecs, `parameters` its parameter count) the activations inside are
    unknown: the estimate counts its weights and its inputs and outputs only, a floor. A symbolic
    length (`--query-len dynamic`) is estimated at the largest length it is verified at
    (`verified_length`): what the export itself runs; a caller's longer inputs are theirs.
    """
    first = next(iter(specs.values()))
    if parameters is not None:
        rows = max([8] + [max(s.batch or 0, s.golden_samples) for s in specs.values()])
        per_sample = sum(math.prod(t.shape[1:]) for t in first.inputs() + first.outputs())
        return int(BASE_BYTES + WEIGHT_COPIES * 4 * parameters
                   + ACTIVATION_COPIES * 4 * rows * per_sample)
    u, h = first.units, first.heads
    fq, fkv = first.query_features, first.kv_features
    tq, tkv = verified_length(first.query_len), verified_length(first.kv_len)
    # The layer's 12 arrays (key_dim = units), fusionlab order.
    params = fq * u + u + fkv * u + u + 3 * (u * h * u + h * u) + h * u * u + u
    rows = 8  # the largest verification batch of a dynamic batch (export.pipeline)
    for spec in specs.values():
        rows = max(rows, spec.batch or 0, spec.golden_samples)
    per_sample = h * tq * tkv + h * u * (tq + 2 * tkv) + tq * (u + fq) + tkv * fkv
    return int(BASE_BYTES + WEIGHT_COPIES * 4 * params + ACTIVATION_COPIES * 4 * rows * per_sample)


def verified_length(length: int | None) -> int:
    """A length axis as the export runs it: itself, or for a symbolic one (None) the largest
    length it is verified at (export.buckets.DYNAMIC_CHECK_LENGTHS)."""
    return max(DYNAMIC_CHECK_LENGTHS) if length is None else length


def _symbolic_note(spec) -> str:
    """`, estimated at length 32 for the dynamic ones` for a spec with a symbolic length."""
    if getattr(spec, "dynamic_lengths", False):
        return f" (dynamic lengths estimated at {max(DYNAMIC_CHECK_LENGTHS)}, the largest verified)"
    return ""


def available_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    available = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
                room = int(limit) - int(f.read().strip())
            available = room if available is None else min(available, room)
    return available


def check_memory(specs: Mapping[str, object], available: int | None = None, *,
                 parameters: int | None = None) -> int:
    """Refuse, before anything is built, a configuration that cannot fit in memory.

    Returns:
        The estimate in bytes.

    Raises:
        OutOfMemoryError: the estimate exceeds the available memory; the message gives both.
    """
    needed = estimate_bytes(specs, parameters)
    available = available_bytes() if available is None else available
    first = next(iter(specs.values()))
    if available is not None and needed > available:
        raise OutOfMemoryError(
            f"this configuration ({first.describe()}) needs about {_gib(needed)} of memory to "
            f"build and verify{_symbolic_note(first)}; {_gib(available)} is available "
            f"(MemAvailable): use fewer --units/--heads or shorter --query-len/--kv-len"
        )
    log.debug("memory   about %s needed%s, %s available", _gib(needed), _symbolic_note(first),
              "?" if available is None else _gib(available))
    return needed


def check_output_dir(path: str) -> None:
    """`--output-dir` is a folder we may write, or can be created; OutputDirError otherwise."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputDirError(f"--output-dir {path} is a file, not a folder")
    existing = path
    while existing and not os.path.isdir(existing):
        existing = os.path.dirname(existing.rstrip(os.sep))
    existing = existing or "."
    if os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK):
        probe = OSError(errno.EACCES, "not writable", existing)
        with contextlib.suppress(OSError):
            statvfs = os.statvfs(existing)
            if statvfs.f_flag & os.ST_RDONLY:
                probe = OSError(errno.EROFS, "Read-only file system", existing)
        raise as_export_error(probe, path)


def as_export_error(error: BaseException, output_dir: str) -> ExportError | None:
    """The typed error for an OS or allocation failure, or None when it is not one of those."""
    os_error = _os_error_in(error)
    if os_error is not None:
        where = os_error.filename or output_dir
        if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFullError(f"no space left on the device writing {where} (errno "
                                 f"{os_error.errno}, {os.strerror(os_error.errno)}); nothing published")
        if os_error.errno == errno.EROFS:
            return OutputDirError(f"--output-dir {output_dir} is on a read-only file system "
                                  f"(writing {where}); nothing published")
        if os_error.errno in (errno.EACCES, errno.EPERM):
            return OutputDirError(f"--output-dir {output_dir} is not writable (permission "
                                  f"denied: {where}); nothing published")
        if os_error.errno in (errno.EEXIST, errno.ENOTDIR) and not os.path.isdir(output_dir):
            return OutputDirError(f"--output-dir {output_dir} is a file, not a folder")
        if os_error.errno == errno.ENOMEM:
            return OutOfMemoryError(f"out of memory ({one_line(first_line(os_error))})")
        if isinstance(error, ConversionError):
            return None
        return OutputDirError(f"cannot write {where}: {os_error.strerror or first_line(os_error)}")
    if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError":
        reason = one_line(first_line(error), 200) if str(error) else type(error).__name__
        return OutOfMemoryError(
            f"out of memory: {reason} (available {_gib(available_bytes() or 0)}); use fewer "
            "--units/--heads or shorter --query-len/--kv-len"
        )
    return None


def _os_error_in(error: BaseException) -> OSError | None:
    """`error` itself, or an OSError it was raised from (a converter wraps the disk's error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def typed_os_errors(output_dir: str) -> Iterator[None]:
    """OS, disk and memory failures inside the block raise as typed errors (one line, own code)."""
    try:
        yield
    except (OSError, MemoryError, ConversionError) as e:
        typed = as_export_error(e, output_dir)
        if typed is None:
            raise
        raise typed from e
    except Exception as e:
        if type(e).__name__ != "ResourceExhaustedError":
            raise
        raise as_export_error(e, output_dir) from e


class _LastStep(logging.Handler):
    """Remembers the last step the export logged, for the heartbeat."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.step = "starting"
        self.since = time.monotonic()

    def emit(self, record):
        if not getattr(record, "heartbeat", False):
            self.step = one_line(record.getMessage(), 80)
            self.since = time.monotonic()


@contextlib.contextmanager
def progress(every: float = 10.0) -> Iterator[None]:
    """While the block runs, log every `every` seconds what it is doing, how long, and its memory.

    A build that takes minutes (a large layer) says it is alive; a quick one prints nothing more.
    """
    last = _LastStep()
    log.addHandler(last)
    done = threading.Event()
    started = time.monotonic()

    def beat():
        while not done.wait(every):
            log.info("working  %.0f s; last step %.0f s ago: %s; memory in use %s",
                     time.monotonic() - started, time.monotonic() - last.since, last.step,
                     _gib(_rss_bytes()), extra={"heartbeat": True})

    thread = threading.Thread(target=beat, name="export-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1)
        log.removeHandler(last)


def _rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0
