"""Lower-precision variants of each exported component, kept only where measurements say they pay.

Per component (measured here, issue 5): int8 *static* QDQ with per-channel weights, calibrated on real training
samples, for the convolutional image encoder (dynamic quantization would turn its convolutions into slow
ConvInteger); int8 *dynamic* quantization restricted to MatMul/Gemm for the recurrent, linear and fusion parts;
fp16 (inputs and outputs kept fp32) for CUDA. Each variant's validation accuracy is measured with the real
runtime (the other components at fp32) and its latency on this machine; a variant is kept only if it loses at
most `max_accuracy_drop` points of accuracy and, for CPU variants, is at least `min_speedup` times faster than
fp32. Every measurement, kept or not, goes into the manifest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from polysense.bundle import sha256_file

log = logging.getLogger("polysense")

CALIBRATION_SAMPLES = 200  # training samples per modality for static quantization


@dataclass(frozen=True)
class VariantPolicy:
    max_accuracy_drop: float = (
        1.0  # points of validation accuracy (all modalities present) a variant may lose
    )
    min_speedup: float = 1.1  # a CPU variant must be this much faster than fp32 (batch 1, this machine)
    precisions: tuple[str, ...] = ("int8", "fp16")  # variants to try besides fp32
    latency_runs: int = 200  # timed batch-1 runs per variant (after 20 warm-up runs); the median counts


@dataclass
class VariantReport:
    precision: str
    method: str
    device: str  # where the variant is meant to run: cpu | cuda
    kept: bool
    reason: str
    file: str | None
    bytes: int
    val_accuracy: float | None
    fp32_val_accuracy: float | None
    accuracy_drop_points: float | None
    val_subsets: dict
    latency_ms: float | None  # batch 1 on this machine's CPU
    fp32_latency_ms: float | None
    speedup: float | None

    def to_dict(self) -> dict:
        return asdict(self)


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


def quantize_int8_static(source: Path, target: Path, input_name: str, samples: list[np.ndarray]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[dict] = iter({input_name: s[None]} for s in samples)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    prepared = target.with_name(target.stem + ".prep.onnx")
    try:
        with _quiet():
            quant_pre_process(str(source), str(prepared))
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
            )
    finally:
        prepared.unlink(missing_ok=True)


def quantize_int8_dynamic(source: Path, target: Path) -> int:
    """MatMul/Gemm-only dynamic quantization; returns how many nodes became integer ops."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QInt8,
            reduce_range=True,  # see quantize_int8_static
        )
    return sum(
        1
        for node in onnx.load(str(target)).graph.node
        if "Integer" in node.op_type or "Quant" in node.op_type
    )


def convert_fp16(source: Path, target: Path) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


def measure_latency(path: Path, feeds: dict[str, np.ndarray], runs: int) -> float:
    """Median milliseconds of one batch-1 run with the runtime's default session settings."""
    from polysense.sessions import Session, SessionSettings

    session = Session(path, SessionSettings(device="cpu"))
    for _ in range(20):
        session.run(feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def file_entry(path: Path, device: str) -> dict:
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "device": device}
