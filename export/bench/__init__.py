"""`python -m export.bench`: our artifacts against Keras's own export of the same weights.

Builds our ONNX and TFLite artifacts through `export.pipeline.export_artifacts` (verified, as a
user gets them) and Keras 3's `model.export(format="onnx")` / `format="litert"` of the same
reference model, then times them interleaved in one process, one call at a time the way a Python
user calls them: onnxruntime `session.run(names, feeds)`; LiteRT `set_tensor` per input,
`invoke()`, `get_tensor` per output. Prints a table (median and p90 µs, speedup, GFLOP/s
counting the layer's documented FLOPs, % of this machine's single-thread SGEMM peak measured in
the same run), sizes, parity, and how ours compares; `--json PATH` writes the same figures.

Each side in its faster form: our ONNX file has a dynamic batch (the default artifact; a fixed
batch measured about 10% slower in onnxruntime, `--onnx-batch fixed` to check), Keras's ONNX
export has the measured batch fixed (a little faster than its dynamic export,
`--keras-onnx-batch dynamic` to check). TFLite files have the measured batch fixed, ours and
Keras's alike.

One module per job: `options` (flags), `peak` (SGEMM peak), `build` (both sides), `timing`
(the interleaved loop), `startup` (end-to-end start-up), `report` (tables and verdicts),
`suite` (the whole run). Importing the package imports none of them (and so not numpy: see
`__main__`).
"""
