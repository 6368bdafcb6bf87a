"""The TFLite graph check: builtin ops only, no shape or variable ops, every tensor static.

ai-edge-litert and numpy only (no TensorFlow).
"""

from __future__ import annotations

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from export.errors import GraphCheckError
from export.spec import ArtifactSpec

# What a static, builtin-only TFLite file must not hold.
TFLITE_FORBIDDEN_OPS = frozenset(
    {"SHAPE", "REDUCE_PROD", "VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE",
     "WHILE", "IF", "CUSTOM", "DELEGATE", "FLEX"}
)


def tflite_op_names(path: str) -> list[str]:
    """Op names before any delegate takes them (builtin resolver without default delegates)."""
    interpreter = Interpreter(
        model_path=path,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    return [op["op_name"] for op in interpreter._get_ops_details()]


# A user's own graph (`--saved-model`) may loop (an LSTM's WHILE) and read shapes inside the loop;
# its tensors must still be static and its ops builtin.
USER_GRAPH_OPS = frozenset({"WHILE", "IF", "SHAPE", "REDUCE_PROD"})


def check_tflite_file(path: str, spec: ArtifactSpec | None = None) -> None:
    """The registry's graph check; a spec with `user_graph` (a SavedModel's) may loop."""
    check_tflite_graph(path, allowed=USER_GRAPH_OPS if spec is not None and spec.user_graph else ())


def check_tflite_graph(path: str, allowed=()) -> None:
    """Builtin ops only, no shape/variable ops, every tensor static.

    Raises:
        GraphCheckError: naming the ops or tensors that break the rule.
    """
    try:
        ops = tflite_op_names(path)
    except Exception as e:
        raise GraphCheckError(f"{path}: LiteRT cannot load it with builtin ops only: {e}") from e
    bad = sorted({op for op in ops if (op in TFLITE_FORBIDDEN_OPS and op not in allowed)
                  or op.startswith("Flex")})
    if bad:
        raise GraphCheckError(f"{path}: non-builtin or dynamic ops {bad}")
    interpreter = Interpreter(model_path=path)
    tensors = interpreter.get_tensor_details()
    if allowed:  # a loop's tensors inside a user's graph: its inputs and outputs stay static
        tensors = interpreter.get_input_details() + interpreter.get_output_details()
    dynamic = [
        t["name"] for t in tensors
        if len(t.get("shape_signature", [])) and (np.asarray(t["shape_signature"]) < 0).any()
    ]
    if dynamic:
        raise GraphCheckError(f"{path}: tensors with a dynamic shape: {dynamic[:5]}")
