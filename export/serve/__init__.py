"""`python -m export.serve`: an alias of export.runtime.serve (verify, then serve).

The Python API lives in export.runtime.serve; its public names are re-exported here so that
`from export.serve import load_models` keeps working.
"""

from export.runtime import serve as _moved
from export.runtime.serve import *  # noqa: F403 - the alias is the moved package's public names

__all__ = list(_moved.__all__)
