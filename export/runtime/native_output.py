"""Capture what C++ code writes straight to file descriptors 1 and 2 (and quiet chatty loggers).

Converters and runtimes (the TFLite calibrator, LiteRT's XNNPACK banner, Keras' exporters) print
from C++ past `sys.stderr`, `--quiet` and TF_CPP_MIN_LOG_LEVEL. Python cannot filter that at the
stream level, so the descriptors themselves are redirected into a temporary file meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


@contextlib.contextmanager
def captured_native_output(
    fds: tuple[int, ...] = (1, 2),
    *,
    keep: Callable[[bytes], bytes] = lambda text: b"",
    on_failure: Callable[[bytes], None] | None = None,
) -> Iterator[None]:
    """Redirect `fds` into a temporary file for the duration of the block.

    On success, `keep(captured)` is written to stderr (by default nothing); when the block raises,
    everything captured (the last 8 KB) goes to `on_failure`, or by default back to stderr, so a
    failure keeps its native context. Exceptions propagate untouched. Not thread-safe:
    descriptors are process-wide.
    """
    try:
        saved = [os.dup(fd) for fd in fds]
    except OSError:  # no such descriptor (a daemon): nothing to capture
        yield
        return
    _flush()
    failed = False
    with tempfile.TemporaryFile() as capture:
        for fd in fds:
            os.dup2(capture.fileno(), fd)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            _flush()
            for fd, old in zip(fds, saved):
                os.dup2(old, fd)
                os.close(old)
            capture.seek(0)
            text = capture.read()
            if failed and on_failure is not None:
                on_failure(text[-8192:])
            else:
                shown = text[-8192:] if failed else keep(text)
                if shown:
                    os.write(2, shown)


def without_lines(*unwanted: bytes) -> Callable[[bytes], bytes]:
    """A `keep` filter passing on every captured line except the `unwanted` ones."""

    def keep(text: bytes) -> bytes:
        return b"".join(
            line for line in text.splitlines(keepends=True) if line.strip() not in unwanted
        )

    return keep


@contextlib.contextmanager
def quieted_logger(name: str | None, level: int) -> Iterator[None]:
    """Raise the Python logger `name` (None: the root logger) to `level` for the block.

    For libraries that log advice a user of `python -m export` can do nothing with (onnxruntime's
    quantization and usability tools); restored whatever happens.
    """
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
