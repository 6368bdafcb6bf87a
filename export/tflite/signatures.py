"""One TFLite file, several signatures: `serving_default` made an alias of the largest bucket.

The converter writes one subgraph per signature key, even when two keys name one function; the
flatbuffer exporter already shares identical constant buffers (the weights) between subgraphs,
but every subgraph keeps its own tensor and op tables (and, in quantized files, its own scales and
zero points). Pointing `serving_default` at the largest bucket's subgraph drops that copy.
"""

from __future__ import annotations

from tensorflow.lite.tools import flatbuffer_utils


def alias_signature(path: str, alias: str, target: str) -> None:
    """Rewrite `path` so that signature `alias` runs the subgraph of signature `target`.

    The subgraph `alias` had is removed, with the buffers only it used.
    """
    model = flatbuffer_utils.read_model(path)
    defs = {d.signatureKey.decode(): d for d in model.signatureDefs}
    dropped, kept = defs[alias].subgraphIndex, defs[target].subgraphIndex
    if dropped == kept:
        return
    del model.subgraphs[dropped]
    for d in model.signatureDefs:
        if d is defs[alias]:
            # The same names, but the tensor indices of the kept subgraph (a quantized file
            # numbers its subgraphs' tensors differently).
            d.subgraphIndex = kept
            d.inputs, d.outputs = defs[target].inputs, defs[target].outputs
        if d.subgraphIndex > dropped:
            d.subgraphIndex -= 1
    # Buffer 0 is the empty sentinel every schema reader expects; metadata lives in buffers too.
    used = {0} | {t.buffer for g in model.subgraphs for t in g.tensors}
    used |= {m.buffer for m in model.metadata or []}
    order = sorted(used)
    new_index = {old: new for new, old in enumerate(order)}
    model.buffers = [model.buffers[i] for i in order]
    for graph in model.subgraphs:
        for tensor in graph.tensors:
            tensor.buffer = new_index[tensor.buffer]
    for m in model.metadata or []:
        m.buffer = new_index[m.buffer]
    flatbuffer_utils.write_model(model, path)
