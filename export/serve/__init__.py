"""`python -m export.serve`: an alias of export.runtime.serve (verify, then serve).

The Python API lives in export.runtime.serve; its public names are re-exported here so that
`from export.serve import load_models` keeps working.
"""

from export.runtime.serve import (
    ENGINES,
    SERVED_FORMATS,
    ServedModel,
    ServeError,
    ServeOptions,
    Server,
    check_options,
    deploy,
    load_models,
    model_name,
    start,
    stop,
)

__all__ = ["ENGINES", "SERVED_FORMATS", "ServeError", "ServeOptions", "ServedModel", "Server",
           "check_options", "deploy", "load_models", "model_name", "start", "stop"]
