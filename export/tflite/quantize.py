"""TFLite variants: the converter options of float16, dynamic-range int8, full int8 and CPU int8
(int8 projections, the attention core in float) files, and the conversion call."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.python import schema_py_generated as schema_fb
from tensorflow.lite.python import schema_util

from export.calibration import Calibration, random_calibration
from export.spec import CALIBRATED_MODES, CPU_FLOAT_OPS, ArtifactSpec, bucket_key


def configure_tflite(spec: ArtifactSpec, calibration: Calibration | None = None) -> Callable | None:
    """A `configure(converter)` for `build_tflite` that sets `spec.quantize`'s converter options."""
    if spec.quantize == "none":
        return None
    if spec.quantize in CALIBRATED_MODES and calibration is None:
        calibration = random_calibration(spec)

    def configure(converter) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if spec.quantize == "float16":
            # float16 weights; the interpreter dequantizes them once and computes in float32
            # on CPUs (XNNPACK), or in float16 on GPUs that have it.
            converter.target_spec.supported_types = [tf.float16]
        elif spec.quantize in CALIBRATED_MODES:
            order = [i.name for i in spec.inputs()]

            def representative_dataset():
                if spec.lengths:
                    # One calibration set per signature, as (key, inputs) pairs.
                    yield from bucket_calibration(spec)
                    return
                for chunk in calibration.batches(spec.batch):
                    yield {name: chunk[name] for name in order}

            converter.representative_dataset = representative_dataset
            # Integer kernels only: an op without one fails the conversion instead of silently
            # running in float.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if spec.quantize == "int8-cpu":
                # Float kernels allowed: the attention core stays float32 (convert_tflite).
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                                       tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            # Per-tensor weight scales for FULLY_CONNECTED. Per-channel ones cost a float32
            # scale and an int64 zero point per output channel, for the weights and again for
            # the int32 biases: at the defaults 0.33x of the float32 file instead of 0.28x
            # (0.36x instead of 0.31x with masks, over the 0.35x bound), for rel_l2 2.1e-2
            # instead of 2.3e-2.
            converter._experimental_disable_per_channel_quantization_for_dense_layers = True
            if spec.int8_io:
                # Float inputs become int8 (bool masks stay bool); scales and zero points go into
                # the manifest.
                converter.inference_input_type = tf.int8
                converter.inference_output_type = tf.int8
        # dynamic-int8: optimizations alone, no representative dataset -> int8 weights,
        # activations quantized on the fly per batch.

    return configure


def convert_tflite(converter, spec) -> bytes:
    """The flatbuffer of `converter` (configured by `configure_tflite`) for `spec`'s variant.

    int8-cpu goes through the converter's own selective quantization (the QuantizationDebugger's
    denylist): calibrated like int8, then quantized with the attention core left in float32
    behind DEQUANTIZE/QUANTIZE pairs: the BATCH_MATMULs whose operands are all computed at run
    time and the ops on the paths between them (the softmax, or the late softmax up to its
    division), found by `attention_core_nodes`. A BATCH_MATMUL with a constant weight stays int8
    as in the int8 file. fully_quantize=False keeps float32 inputs and outputs. With nothing
    denylisted this path gives today's int8 file.
    """
    if spec.quantize != "int8-cpu":
        return converter.convert()
    # The debugger hands mlir_quantize `_experimental_disable_per_channel` only: the dense-layer
    # flag configure_tflite sets for int8 would be ignored, so say the same thing in this one
    # (per-channel here: the same speed, 1.98e-2 instead of 2.25e-2, 1.2x the bytes).
    converter._experimental_disable_per_channel = True
    debug = tf.lite.experimental.QuantizationDebugOptions
    # The first options only calibrate; the denylist needs the calibrated graph's tensor names.
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=converter.representative_dataset,
        debug_options=debug(fully_quantize=False))
    nodes = attention_core_nodes(debugger.calibrated_model)
    debugger.options = debug(denylisted_nodes=nodes, fully_quantize=False)
    return debugger.get_nondebug_quantized_model()


def attention_core_nodes(flatbuffer: bytes, ops: tuple[str, ...] = CPU_FLOAT_OPS) -> list[str]:
    """Output tensor names of the attention core of every subgraph (signature), by a graph walk.

    A core BATCH_MATMUL takes no constant (each operand is a subgraph input or another op's
    output). From each one the walk goes forward through the ops it feeds, stopping at core
    BATCH_MATMULs and at projections (ops with a constant weight: FULLY_CONNECTED, CONV_2D,
    DEPTHWISE_CONV_2D, a BATCH_MATMUL with a constant operand). Its ends are the core
    BATCH_MATMULs it reaches (the weighted sum after the scores) and the ops it reaches that also
    take such a BATCH_MATMUL's output (the late softmax's division by the row sums). The core is
    the core BATCH_MATMULs and every op of the walk on a path to one of its ends: the softmax,
    or the late softmax's REDUCE_MAX, SUB, EXP, SUM, mask ADD/MUL, reshapes and DIV. An op of the
    same type elsewhere (a SUB or EXP before or after an attention, across a projection) is not
    on such a path and stays int8.

    Every other op of type `ops` whose operands are all computed at run time is kept as well
    (SOFTMAX by default, which XNNPACK cannot run in int8: a model's own softmax included).
    """
    model = schema_fb.ModelT.InitFromPackedBuf(flatbuffer, 0)
    codes = [schema_util.get_builtin_code_from_operator_code(c) for c in model.operatorCodes]
    code = schema_fb.BuiltinOperator
    wanted = {getattr(code, op) for op in ops if op != "BATCH_MATMUL"}
    projections = {code.FULLY_CONNECTED, code.CONV_2D, code.DEPTHWISE_CONV_2D}
    names: list[str] = []
    for graph in model.subgraphs:
        computed = set(graph.inputs.tolist() if graph.inputs is not None else [])
        for op in graph.operators:
            computed.update(op.outputs.tolist())
        operators = list(graph.operators)
        operands = [[i for i in op.inputs.tolist() if i >= 0] for op in operators]
        run_time = [all(i in computed for i in ins) for ins in operands]
        core_mm = {n for n, op in enumerate(operators)
                   if codes[op.opcodeIndex] == code.BATCH_MATMUL and run_time[n]}
        stops = core_mm | {n for n, op in enumerate(operators)
                           if codes[op.opcodeIndex] in projections
                           or (codes[op.opcodeIndex] == code.BATCH_MATMUL and not run_time[n])}
        consumers: dict[int, list[int]] = {}
        for n, ins in enumerate(operands):
            for i in ins:
                consumers.setdefault(i, []).append(n)
        produced_by = {t: n for n, op in enumerate(operators) for t in op.outputs.tolist()}
        keep: set[int] = set()
        for start in sorted(core_mm):
            # Forward walk: projections are not entered, core BATCH_MATMULs not passed.
            reached: set[int] = set()
            frontier = [start]
            while frontier:
                n = frontier.pop()
                for t in operators[n].outputs.tolist():
                    for c in consumers.get(t, []):
                        if c in reached or (c in stops and c not in core_mm):
                            continue
                        reached.add(c)
                        if c not in core_mm:
                            frontier.append(c)
            ends = {n for n in reached if n in core_mm}
            ends |= {n for n in reached if n not in stops and any(
                produced_by.get(i) in ends for i in operands[n])}
            if not ends:
                continue
            # Backward from the ends, within the walk: the ops on a path start -> end.
            on_path = set(ends)
            frontier = list(ends)
            while frontier:
                n = frontier.pop()
                for i in operands[n]:
                    p = produced_by.get(i)
                    if p in reached and p not in on_path and p not in stops:
                        on_path.add(p)
                        frontier.append(p)
            keep |= on_path | {start}
        keep |= {n for n, op in enumerate(operators)
                 if codes[op.opcodeIndex] in wanted and run_time[n]}
        for n in sorted(keep):
            names += [graph.tensors[i].name.decode() for i in operators[n].outputs.tolist()]
    return list(dict.fromkeys(names))


def bucket_calibration(spec: ArtifactSpec):
    """(signature key, inputs) pairs of seeded calibration rows for every length bucket."""
    for q, kv in spec.lengths:
        at = spec.replace(lengths=(), query_len=q, kv_len=kv, name=spec.name)
        for chunk in random_calibration(at).batches(spec.batch):
            yield bucket_key(q, kv), {i.name: chunk[i.name] for i in at.inputs()}


def tflite_io_quantization(path: str) -> dict[str, dict]:
    """{tensor name: {"scale", "zero_point"}} of a TFLite file's integer inputs and outputs."""
    runner = Interpreter(model_path=path).get_signature_runner("serving_default")
    found = {}
    for details in (runner.get_input_details(), runner.get_output_details()):
        for name, detail in details.items():
            if np.dtype(detail["dtype"]).kind in "iu":
                scale, zero_point = detail["quantization"]
                found[name] = {"scale": float(scale), "zero_point": int(zero_point)}
    return found

