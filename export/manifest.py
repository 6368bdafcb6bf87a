"""`export.manifest` moved to `export.runtime.manifest` (the runtime half, export/runtime/). This alias
keeps the old path that the API reference and the examples documented importing: it *is* the moved
module (one object: a monkeypatch through either name reaches both)."""

import sys

from export.runtime import manifest as _moved

sys.modules[__name__] = _moved
