"""Fold zero Pad nodes into the convolutions they feed.

TensorFlow-"SAME" convolutions (the EfficientNet-Lite families) pad a stride-2 convolution one pixel more at the
bottom/right than at the top/left; torch cannot say that in a Conv, so the exporter writes a Pad before it. ONNX
Conv can (its `pads` attribute holds begin and end per axis), and a separate Pad is costly where it stands:
onnxruntime does not fuse the exporter's Pad (its constant value is an empty input, which its PadFusion rejects),
and in a static int8 graph every Pad is a float island between a DequantizeLinear and a QuantizeLinear.
Measured on EfficientNet-Lite0 at 192 px, batch 1, 2 threads (docs/export.md, "Padding inside the convolutions").
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Remove every zero-valued constant Pad whose only reader is a Conv, moving its padding into the Conv's
    `pads`; returns how many were folded. The pads' constant arithmetic goes too where nothing else reads it."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    folded = []
    for pad in [node for node in graph.node if node.op_type == "Pad"]:
        conv = _only_conv_reader(pad, readers, outputs)
        pads = _constant(model, producers, pad.input[1]) if conv is not None and len(pad.input) > 1 else None
        if pads is None or not _zero_constant_pad(model, producers, pad) or pads.size != 2 * _rank(conv):
            continue
        rank = _rank(conv)
        begin, end = pads[:rank].tolist(), pads[rank:].tolist()
        if begin[:2] != [0, 0] or end[:2] != [0, 0] or min(begin + end) < 0:
            continue  # padding batch or channels, or cropping: not something a Conv does
        spatial = rank - 2
        current = _conv_pads(conv, spatial)
        if current is None:
            continue
        merged = [a + b for a, b in zip(current, begin[2:] + end[2:])]
        _set_pads(conv, merged)
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    _remove_dead_chains(graph, [name for pad in folded for name in pad.input[1:] if name])
    return len(folded)


def _only_conv_reader(
    pad: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]], outputs: set[str]
) -> onnx.NodeProto | None:
    reading = readers.get(pad.output[0], [])
    if pad.output[0] in outputs or len(reading) != 1 or reading[0].op_type != "Conv":
        return None
    conv = reading[0]
    return conv if conv.input[0] == pad.output[0] else None


def _rank(conv: onnx.NodeProto) -> int:
    """The Conv's input rank, from its weight's kernel attribute (batch, channels and the spatial axes)."""
    kernel = next((a.ints for a in conv.attribute if a.name == "kernel_shape"), None)
    return 2 + len(kernel) if kernel else 4


def _conv_pads(conv: onnx.NodeProto, spatial: int) -> list[int] | None:
    """The Conv's explicit pads, or None where auto_pad decides them (then a Pad cannot be folded in)."""
    attributes = {a.name: a for a in conv.attribute}
    if "auto_pad" in attributes and attributes["auto_pad"].s not in (b"", b"NOTSET"):
        return None
    return list(attributes["pads"].ints) if "pads" in attributes else [0] * (2 * spatial)


def _set_pads(conv: onnx.NodeProto, pads: list[int]) -> None:
    for attribute in list(conv.attribute):
        if attribute.name == "pads":
            conv.attribute.remove(attribute)
    conv.attribute.append(onnx.helper.make_attribute("pads", pads))


def _zero_constant_pad(model: onnx.ModelProto, producers: dict, pad: onnx.NodeProto) -> bool:
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant" or len(pad.input) > 3:  # a fourth input (axes) pads only some axes
        return False
    if len(pad.input) < 3 or not pad.input[2]:
        return True  # no constant value: zeros
    value = _constant(model, producers, pad.input[2])
    return value is not None and not np.any(value)


def _constant(model: onnx.ModelProto, producers: dict, name: str) -> np.ndarray | None:
    """The value of `name` where it depends on no graph input (an initializer, or arithmetic on constants)."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    if name in initializers:
        return numpy_helper.to_array(initializers[name])
    needed, wanted, seen = [], [name], set()
    while wanted:
        value = wanted.pop()
        if value in seen or value in initializers or not value:
            continue
        seen.add(value)
        node = producers.get(value)
        if node is None or node.op_type in ("Shape", "Size"):  # a graph input, or its shape
            return None
        needed.append(node)
        wanted.extend(node.input)
    order = {id(node): index for index, node in enumerate(graph.node)}
    nodes = sorted({id(node): node for node in needed}.values(), key=lambda node: order[id(node)])
    used = {value for node in nodes for value in node.input}
    subgraph = onnx.helper.make_graph(
        nodes,
        "constant",
        [],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
        [tensor for tensor in graph.initializer if tensor.name in used],
    )
    try:
        evaluator = ReferenceEvaluator(onnx.helper.make_model(subgraph, opset_imports=model.opset_import))
        return np.asarray(evaluator.run(None, {})[0])
    except Exception:  # an op the reference evaluator lacks, or bad constants: leave this Pad as it is
        return None


def _remove_dead_chains(graph: onnx.GraphProto, values: list[str]) -> None:
    """Remove the producers of `values` (the folded Pads' pads), and what only they read, where nothing reads
    their outputs any more: the graph's other nodes, its outputs and its subgraphs' nodes count as readers."""
    producers = {out: node for node in graph.node for out in node.output}
    removed: set[str] = set()  # by their first output: a node's name may be empty
    while values:
        node = producers.get(values.pop())
        if node is None or node.output[0] in removed or any(out in _read_names(graph) for out in node.output):
            continue
        graph.node.remove(node)
        removed.add(node.output[0])
        values.extend(name for name in node.input if name)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every value read in `graph`: node inputs (those of subgraphs included) and graph outputs."""
    read = {value.name for value in graph.output}
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                read |= _read_names(subgraph)
    return read
