"""The ops TensorFlow Lite for Microcontrollers has kernels for, and what a file asks of it.

`TFLM_OPS` maps a TFLite builtin op to the `tflite::MicroMutableOpResolver` method that registers
its kernel (tensorflow/lite/micro/micro_mutable_op_resolver.h); an op outside it has no TFLM kernel.
The file is read with the flatbuffer schema `tflite_micro` ships: numpy and tflite-micro only.
"""

from __future__ import annotations

from dataclasses import dataclass

# Builtin op -> its MicroMutableOpResolver::Add* method (the TFLM kernels of
# micro_mutable_op_resolver.h, as of the tflite-micro wheel pinned by pyproject.toml).
TFLM_OPS: dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin", "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_MATMUL": "AddBatchMatMul",
    "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd", "BROADCAST_ARGS": "AddBroadcastArgs",
    "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce", "CAST": "AddCast",
    "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "ELU": "AddElu", "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "EQUAL": "AddEqual",
    "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor",
    "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather", "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish",
    "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D",
    "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual",
    "LOG": "AddLog", "LOG_SOFTMAX": "AddLogSoftmax", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D", "MAXIMUM": "AddMaximum", "MEAN": "AddMean",
    "MINIMUM": "AddMinimum", "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2",
    "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu",
    "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound", "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape",
    "SIN": "AddSin", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax",
    "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf",
    "TANH": "AddTanh", "TRANSPOSE": "AddTranspose", "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}


def schema():
    """The TFLite flatbuffer schema tflite-micro ships (no TensorFlow, no LiteRT)."""
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated  # lazy: optional runtime

    return schema_py_generated


@dataclass(frozen=True)
class ModelFacts:
    """What a TFLite flatbuffer asks of TFLM: its ops and its signature's tensor names.

    Attributes:
        ops: the builtin op names of every subgraph, each once, in the order first used.
        custom: custom op codes (TFLM resolves none of ours).
        inputs: signature input name -> position in the subgraph's inputs (TFLM's input index).
        outputs: signature output name -> position in the subgraph's outputs.
        subgraphs: the number of subgraphs.
    """

    ops: tuple[str, ...]
    custom: tuple[str, ...]
    inputs: dict[str, int]
    outputs: dict[str, int]
    subgraphs: int


def read_model(data: bytes) -> ModelFacts:
    """Parse a TFLite flatbuffer's op codes and its `serving_default` signature.

    TFLM addresses inputs and outputs by position only; the names come from the signature, whose
    entries point at tensor indices, mapped here to their positions in subgraph 0's input and
    output lists (the converter writes `source2` before `source1` there).
    """
    fb = schema()
    model = fb.Model.GetRootAsModel(data, 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    ops, custom = [], []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for i in range(graph.OperatorsLength()):
            code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin == fb.BuiltinOperator.CUSTOM:
                name = (code.CustomCode() or b"?").decode("utf-8", "replace")
                if name not in custom:
                    custom.append(name)
                continue
            name = names.get(builtin, f"BUILTIN_{builtin}")
            if name not in ops:
                ops.append(name)
    graph = model.Subgraphs(0)
    graph_inputs = [graph.Inputs(i) for i in range(graph.InputsLength())]
    graph_outputs = [graph.Outputs(i) for i in range(graph.OutputsLength())]
    inputs = {f"input_{i}": i for i in range(len(graph_inputs))}
    outputs = {f"output_{i}": i for i in range(len(graph_outputs))}
    for s in range(model.SignatureDefsLength()):
        signature = model.SignatureDefs(s)
        if signature.SignatureKey() != b"serving_default" or signature.SubgraphIndex() != 0:
            continue
        inputs = {_text(signature.Inputs(i).Name()): graph_inputs.index(signature.Inputs(i).TensorIndex())
                  for i in range(signature.InputsLength())}
        outputs = {_text(signature.Outputs(i).Name()):
                   graph_outputs.index(signature.Outputs(i).TensorIndex())
                   for i in range(signature.OutputsLength())}
    return ModelFacts(tuple(ops), tuple(custom), inputs, outputs, model.SubgraphsLength())


def missing_ops(facts: ModelFacts) -> list[str]:
    """The file's ops TFLM has no kernel for (custom ops included), sorted."""
    return sorted({op for op in facts.ops if op not in TFLM_OPS} | {f"CUSTOM:{c}" for c in facts.custom})


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
