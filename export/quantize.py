"""Quantized and half-precision copies of an exported graph (onnxruntime's quantization tools).

Which method fits which component, and why, is in variants.py; this module only converts files.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from polysense.export.parity import ExportError


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizer prints advice and per-tensor notes on stdout and the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_int8_static(
    source: Path, target: Path, feeds: list[dict[str, np.ndarray]], exact_outputs: tuple[str, ...] = ()
) -> None:
    """Static QDQ int8, activations calibrated on `feeds` (one dict of graph inputs per calibration sample).

    `exact_outputs` (a streaming encoder's state) and every node they are computed from stay float: a state
    quantized at each call drifts from the one a single call carries inside the graph, so streaming would no
    longer equal offline (measured on the windowed audio family: embeddings 0.66 apart on a 5 s stream)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[dict] = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    prepared = target.with_name(target.stem + ".prep.onnx")
    try:
        with _quiet():
            quant_pre_process(str(source), str(prepared))
            graph = onnx.load(str(prepared)).graph
            quantize_static(
                str(prepared),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                # 7-bit weights: x86 CPUs without VNNI saturate u8 x s8 products in their int8 kernels. Measured
                # on this AVX2 machine for the image encoder: max embedding error 50 % of its range without it
                # (5.3 points of accuracy lost), 1.7 % with it, at the same 1.6x speed-up over fp32.
                reduce_range=True,
                nodes_to_exclude=_computing(graph, exact_outputs),
            )
    finally:
        prepared.unlink(missing_ok=True)
    _require_float(target, exact_outputs)


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Each value of the graph -> the node that outputs it."""
    return {out: node for node in graph.node for out in node.output}


def _computing(graph: onnx.GraphProto, outputs: tuple[str, ...]) -> list[str]:
    """The names of the nodes that `outputs` are computed from (themselves included)."""
    producers = _producers(graph)
    wanted, seen, names = list(outputs), set(), []
    while wanted:
        node = producers.get(wanted.pop())
        if node is None or id(node) in seen:  # by identity: a node's name may be empty
            continue
        seen.add(id(node))
        names.append(node.name)
        wanted.extend(node.input)
    return names


def _require_float(path: Path, outputs: tuple[str, ...]) -> None:
    """Fail loudly if the quantizer still put a quantize/dequantize pair on an output that must stay exact."""
    producers = _producers(onnx.load(str(path)).graph)
    quantized = [
        name for name in outputs if getattr(producers.get(name), "op_type", "") == "DequantizeLinear"
    ]
    if quantized:
        raise ExportError(f"static int8 quantized the streaming state {quantized}; it must stay float")


def quantize_int8_dynamic(source: Path, target: Path) -> int:
    """Dynamic quantization of MatMul/Gemm weights, per output channel, of embedding tables (Gather) and of
    onnxruntime's fused Attention (to QAttention; MiniLM's int8 form); returns how many nodes became integer ops.

    Per channel, because one scale per tensor loses too much on a pretrained transformer: on MiniLM-L6 the
    cosine to fp32 was 0.68 at worst per tensor, 0.975 per channel, at 1.9x fp32 speed either way. Quantizing
    the 30522 x 384 embedding table takes the MiniLM graph from 55 to 21 MB (fp32: 86 MB)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul", "Gemm", "Gather", "Attention"],  # Attention: QAttention
            per_channel=True,
            weight_type=QuantType.QInt8,
            reduce_range=True,  # see quantize_int8_static
        )
    return sum(
        1
        for node in onnx.load(str(target)).graph.node
        if "Integer" in node.op_type or "Quant" in node.op_type or node.op_type == "QAttention"
    )


# Streaming state that accumulates over a whole recording (sums and counts). In fp16 a sum stops growing once its
# spacing exceeds what a frame adds and overflows at 65504: the running-normalisation sum of a 2-minute stream
# passed it, and the fp16 audio encoder's state turned to inf/NaN. These stay fp32 end to end (convert_fp16).
ACCUMULATORS = ("pool_sum", "pool_count", "band_sum")


def convert_fp16(source: Path, target: Path) -> None:
    """fp16 weights and activations with fp32 inputs and outputs, except the accumulating state (ACCUMULATORS):
    the nodes it flows through, up to the division that makes it a mean, run fp32, and it never takes the
    fp16 round trip that keep_io_types puts on every graph input and output."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    blocked = _accumulator_nodes(model.graph)
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked or None)
    if blocked:
        _skip_fp16_round_trips(model.graph, blocked)
    onnx.save(model, str(target))


def _accumulator_nodes(graph: onnx.GraphProto) -> list[str]:
    """The nodes fed, directly or through other such nodes, by an accumulating state input; a Div (a sum over a
    count: back to an ordinary magnitude) ends a chain."""
    frontier = {i.name for i in graph.input if i.name in ACCUMULATORS}
    blocked: list[str] = []
    while frontier:
        following = set()
        for node in graph.node:
            if node.name not in blocked and any(name in frontier for name in node.input):
                blocked.append(node.name)
                if node.op_type != "Div":
                    following.update(node.output)
        frontier = following
    return blocked


def _skip_fp16_round_trips(graph: onnx.GraphProto, blocked: list[str]) -> None:
    """Where the converter casts an fp32 accumulator value to fp16 and straight back (graph input -> blocked node,
    blocked node -> graph output), read the fp32 value instead: the second Cast becomes a lossless fp32 -> fp32."""
    fp32_values = {i.name for i in graph.input if i.name in ACCUMULATORS}
    fp32_values |= {out for node in graph.node if node.name in blocked for out in node.output}
    producers = _producers(graph)
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = producers.get(node.input[0])
        if first is not None and first.op_type == "Cast" and first.input[0] in fp32_values:
            node.input[0] = first.input[0]


def _cast_to(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "to"), -1)
