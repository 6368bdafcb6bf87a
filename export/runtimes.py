"""`export.runtimes` moved to `export.runtime.runtimes` (the runtime half, export/runtime/). This alias
keeps the old path that the API reference and the examples documented importing: it *is* the moved
module (one object: a monkeypatch through either name reaches both)."""

import sys

from export.runtime import runtimes as _moved

sys.modules[__name__] = _moved
