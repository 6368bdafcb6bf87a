"""SavedModel artifact: the inference function saved with the signature `serving_default`."""

from __future__ import annotations

import os
import sys

from export.errors import ConversionError
from export.spec import ArtifactSpec


def build_savedmodel(spec: ArtifactSpec, fn, workdir: str) -> str:
    """Save `fn` (from `export.graph.build_inference_function`) under `workdir`; return the folder."""
    import tensorflow as tf

    path = os.path.join(workdir, spec.artifact_name("savedmodel"))
    # The signature alone: attaching `fn` to the module as well saves a second trace of it,
    # with a second copy of every weight constant (twice the file size).
    module = tf.Module()
    try:
        tf.saved_model.save(
            module, path, signatures={"serving_default": fn.get_concrete_function()}
        )
    except Exception as e:
        raise ConversionError(f"SavedModel export failed: {e}") from e
    return path


def main(argv: list[str] | None = None) -> int:
    from export.cli import main as cli_main

    return cli_main(argv, formats=("savedmodel",), prog="python -m export.savedmodel")


if __name__ == "__main__":
    sys.exit(main())
