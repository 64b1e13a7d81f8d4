"""Lower-precision variants of each exported component, kept only where measurements say they pay.

Per component (measured here, issue 5): int8 *static* QDQ with per-channel weights, calibrated on real training
samples, for the convolutional image encoder (dynamic quantization would turn its convolutions into slow
ConvInteger); int8 *dynamic* quantization restricted to MatMul/Gemm for the recurrent, linear and fusion parts;
fp16 (inputs and outputs kept fp32) for CUDA. Each variant's validation accuracy is measured with the real
runtime (the other components at fp32) and its latency where it runs (CPU variants on this CPU; CUDA variants
on CUDA, against fp32 on CUDA, only when this machine has a working CUDA device). A variant is kept only if it
loses at most `max_accuracy_drop` points of accuracy and is at least `min_speedup` times faster than fp32 on its
device; a CUDA variant exported without CUDA is kept on accuracy alone and never counted as paying. Every
measurement, kept or not, goes into the bundle description.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from polysense.bundle.reader import sha256_file
from polysense.bundle.schema import PRECISIONS, BundleDescription, Variant
from polysense.errors import ConfigError
from polysense.export.components import Component
from polysense.export.parity import check_component, export_component
from polysense.export.quantize import convert_fp16, quantize_int8_dynamic, quantize_int8_static
from polysense.models.training.flags import option

log = logging.getLogger("polysense")

CALIBRATION_SAMPLES = 200  # training samples per modality for static quantization
_ROUNDS = 5  # latency is timed in this many rounds, alternating between the graphs compared
_WARM_UP_PER_ROUND = 4  # untimed runs of a graph before its timed runs in each round


@dataclass(frozen=True)
class VariantPolicy:
    """Which lower-precision variants export tries and keeps; its fields are `polysense export` flags."""

    max_accuracy_drop: float = option(
        1.0, help="validation accuracy points a variant may lose (all modalities present)"
    )
    min_speedup: float = option(
        1.1, help="how much faster than fp32 a variant must be on its device (batch 1)"
    )
    precisions: tuple[str, ...] = option(
        ("int8", "fp16"), help="variants to try besides fp32 ('fp32' alone: none)"
    )
    latency_runs: int = option(
        200, help="timed batch-1 runs per variant, in rounds alternating with fp32; the median counts"
    )

    def __post_init__(self) -> None:
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise ConfigError(
                f"--precisions: {unknown[0]!r} is unknown; choose from {', '.join(PRECISIONS[1:])} (or fp32 alone)"
            )
        object.__setattr__(self, "precisions", tuple(p for p in self.precisions if p != "fp32"))
        if not (self.max_accuracy_drop >= 0 and self.min_speedup >= 0 and self.latency_runs >= 1):
            raise ConfigError(
                "--max-accuracy-drop and --min-speedup cannot be negative, and --latency-runs must be at least 1"
            )


@dataclass(frozen=True)
class Candidate:
    precision: str
    method: str
    device: str  # where the variant is meant to run: cpu | cuda
    path: Path


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
    latency_ms: float | None  # batch 1 where the variant runs (CPU; CUDA only when export had CUDA)
    fp32_latency_ms: float | None
    speedup: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(path: Path, feeds: dict[str, np.ndarray], runs: int, device: str = "cpu") -> float | None:
    """Median milliseconds of one batch-1 run with the runtime's default session settings on `device`; None when
    CUDA was asked for but the session fell back to the CPU (its figure would not be a CUDA one)."""
    measured = compare_latency([path], feeds, runs, device)
    return None if measured is None else measured[0]


def compare_latency(
    paths: Sequence[Path], feeds: dict[str, np.ndarray], runs: int, device: str = "cpu"
) -> list[float] | None:
    """Median milliseconds of one batch-1 run of each graph, measured side by side: all sessions open at once
    and timed in alternating rounds, so a change in the machine's speed while measuring (another process, clock
    scaling) reaches every graph alike. Timed one after the other, fp32 first and each variant after its
    validation, the AV-digits audio encoder's fp32 came out 0.25 ms in one run of the benchmark and 0.16 ms in
    the next, which turned its int8 from kept (1.61x) to rejected (0.97x).
    None when CUDA was asked for but a session fell back to the CPU."""
    from polysense.inference.sessions import Session, SessionSettings, to_numpy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning: the None below says it
        sessions = [Session(path, SessionSettings(device=device)) for path in paths]
    if device == "cuda" and not all(session.on_cuda for session in sessions):
        return None
    times: list[list[float]] = [[] for _ in sessions]
    per_round = max(1, math.ceil(runs / _ROUNDS))
    for _ in range(_ROUNDS):
        for session, timed in zip(sessions, times):
            for _ in range(_WARM_UP_PER_ROUND):
                session.run(feeds)
            for _ in range(per_round):
                start = time.perf_counter()
                to_numpy(session.run(feeds)[0])  # under CUDA the outputs stay on the device until asked for
                timed.append((time.perf_counter() - start) * 1000)
    return [statistics.median(timed) for timed in times]


def cuda_available() -> bool:
    """Whether this onnxruntime can run on CUDA here (a CUDA variant's speed is measured only then)."""
    from polysense.inference.sessions import CUDA, import_onnxruntime

    return CUDA in import_onnxruntime().get_available_providers()


def variant_of(path: Path, precision: str, device: str, latency_ms: float | None = None) -> Variant:
    return Variant(precision, path.name, sha256_file(path), path.stat().st_size, device, latency_ms)


def quantize_dynamic_int8_of(component: Component, fp32_path: Path, target: Path) -> str | None:
    """Dynamic int8 of one component into `target`; returns how it was made, or None if nothing was quantized.

    It quantizes the fp32 file, or where the family exports another form for int8 (MiniLM: onnxruntime's fused
    attention), that form: written beside `target`, checked against torch on random inputs (padded batches
    included), then removed. Should that form fail to export or to match torch, the fp32 graph is quantized
    instead, with a warning: an int8 variant is an option, the fp32 bundle must not be lost to it."""
    source = _int8_form(component, target) if component.int8_export is not None else None
    try:
        quantized = quantize_int8_dynamic(source or fp32_path, target)
    finally:
        if source is not None:
            source.unlink(missing_ok=True)
    fused = " + Attention (fused)" if source is not None else ""
    return f"dynamic, per-channel MatMul/Gemm + Gather{fused}" if quantized else None


def _int8_form(component: Component, target: Path) -> Path | None:
    """The family's int8 export form of `component`, checked against torch; None (and no file) if it fails."""
    source = target.with_name(f"{target.stem}.source.onnx")
    try:
        with component.int8_export():
            export_component(component, source)
            check_component(component, source, [])
    # Whatever failed (the exporter, the onnx checker, onnxruntime, whose errors subclass Exception alone, or
    # parity), the plain fp32 graph can still be quantized.
    except Exception as error:
        source.unlink(missing_ok=True)
        log.warning(
            "%s: its int8 export form failed (%s); quantizing the fp32 graph instead", component.name, error
        )
        return None
    return source


def candidates(
    component: Component,
    fp32_path: Path,
    policy: VariantPolicy,
    calibration: Callable[[Component], list[dict[str, np.ndarray]]],
) -> Iterator[Candidate]:
    """Each variant of one component worth trying, written next to its fp32 file."""
    if "int8" in policy.precisions:
        path = fp32_path.with_name(f"{component.name}.int8.onnx")
        if component.int8_method == "static":  # the encoder family asks for it: dense convolutions
            feeds = calibration(component)
            quantize_int8_static(fp32_path, path, feeds, tuple(s.output_name for s in component.state))
            method = f"static QDQ, per-channel weights, {len(feeds)} training samples"
            yield Candidate("int8", method, "cpu", path)
        elif method := quantize_dynamic_int8_of(component, fp32_path, path):
            yield Candidate("int8", method, "cpu", path)
        else:
            path.unlink(missing_ok=True)
    if "fp16" in policy.precisions:
        path = fp32_path.with_name(f"{component.name}.fp16.onnx")
        convert_fp16(fp32_path, path)
        yield Candidate("fp16", "fp16 weights and activations, fp32 inputs/outputs", "cuda", path)


def resolution_caveat(samples: int, policy: VariantPolicy) -> str:
    """What the accuracy check is worth when one validation sample weighs more than the accuracy budget ("" when
    it can see a loss within budget): on 2 samples, "0.00 points lost" says almost nothing."""
    points = 100 / samples if samples else float("inf")
    # A budget of 0 refuses any flipped sample, which any count sees.
    if points <= policy.max_accuracy_drop or (samples and policy.max_accuracy_drop == 0):
        return ""
    return (
        f"{samples} validation samples, each {points:.2f} accuracy points, over the "
        f"{policy.max_accuracy_drop:g}-point budget: a variant's accuracy is barely checked; "
        f"{math.ceil(100 / policy.max_accuracy_drop)} or more check it"
    )


def decide(device: str, drop: float, speedup: float | None, policy: VariantPolicy) -> tuple[bool, str]:
    """Keep a variant that loses at most the accuracy budget and is measured faster where it runs; a CUDA variant
    without a CUDA measurement is kept (for those who ask for it) but never counted as paying."""
    if drop > policy.max_accuracy_drop:
        return (
            False,
            f"rejected: loses {drop:.2f} points of validation accuracy (> {policy.max_accuracy_drop})",
        )
    if device == "cuda" and speedup is None:
        return True, (
            "kept for CUDA, speed not measured (no CUDA at export): `auto` runs fp32 on CUDA until it is; "
            "precision fp16 asks for it"
        )
    if speedup < policy.min_speedup:
        return False, f"rejected: {speedup:.2f}x fp32 speed on {device.upper()} (< {policy.min_speedup}x)"
    if speedup > 1.0:
        return True, f"kept: accuracy within budget, {speedup:.2f}x fp32 speed on {device.upper()}"
    # Only a --min-speedup at or below 1 keeps a variant that is not faster; say so rather than call it faster.
    return True, (
        f"kept: accuracy within budget, {speedup:.2f}x fp32 speed on {device.upper()} "
        f"(not faster; --min-speedup {policy.min_speedup} allows it)"
    )


@dataclass(frozen=True)
class VariantTrial:
    """How add_variants measures: validation accuracy of a description written to the bundle folder."""

    folder: Path
    write: Callable[[BundleDescription], None]  # writes the description into `folder`
    validate: Callable[[dict[str, str]], dict]  # {component: precision} -> validation metrics
    calibration: Callable[[Component], list[dict[str, np.ndarray]]]  # real training inputs for static int8


def _with_component(description: BundleDescription, name: str, **changes) -> BundleDescription:
    components = dict(description.components)
    components[name] = replace(components[name], **changes)
    return replace(description, components=components)


def add_variants(
    description: BundleDescription,
    parts: list[Component],
    latency_feeds: dict[str, tuple[np.ndarray, ...]],
    policy: VariantPolicy,
    trial: VariantTrial,
    progress: bool,
) -> BundleDescription:
    """Try each variant of each component, keep those that pay, record every measurement."""
    base = trial.validate({})
    base_accuracy = base["accuracy"]
    caveat = resolution_caveat(base["count"], policy)
    if caveat:
        log.warning("lower-precision variants are judged on too few validation samples: %s", caveat)
    for component in tqdm(parts, desc="precision variants", unit="graph", disable=not progress, leave=False):
        spec = description.component(component.name)
        fp32_path = trial.folder / spec.variant("fp32").file
        feeds = dict(zip(component.inputs, latency_feeds[component.name]))
        fp32_ms = measure_latency(fp32_path, feeds, policy.latency_runs)
        kept = {"fp32": replace(spec.variant("fp32"), device="any", latency_ms=fp32_ms)}
        reports = []
        for candidate in candidates(component, fp32_path, policy, trial.calibration):
            trying = variant_of(candidate.path, candidate.precision, candidate.device)
            trial.write(
                _with_component(description, component.name, variants={**kept, candidate.precision: trying})
            )
            report = _measure(
                candidate, trial, feeds, policy, base_accuracy, fp32_ms, component.name, fp32_path
            )
            if caveat and report.kept:  # kept, but the accuracy check could not see a loss within budget
                report = replace(report, reason=f"{report.reason} ({caveat})")
            reports.append(report)
            if candidate.device == "cpu" and report.fp32_latency_ms is not None:
                # `auto` picks the fastest kept variant by latency_ms: fp32's figure must come from the same
                # side-by-side timing as the variant's, or drift between the two could undo the decision.
                kept["fp32"] = replace(kept["fp32"], latency_ms=report.fp32_latency_ms)
            if report.kept:
                kept[candidate.precision] = replace(trying, latency_ms=report.latency_ms)
            else:
                candidate.path.unlink()
        description = _with_component(
            description, component.name, variants=kept, measurements=tuple(r.to_dict() for r in reports)
        )
        trial.write(description)
    return description


def _measure(
    candidate: Candidate,
    trial: VariantTrial,
    feeds: dict[str, np.ndarray],
    policy: VariantPolicy,
    base_accuracy: float,
    fp32_ms: float,
    component: str,
    fp32_path: Path,
) -> VariantReport:
    metrics = trial.validate({component: candidate.precision})
    latency: float | None = None
    # Against fp32 on the variant's own device: a CPU figure says nothing about a CUDA variant.
    if candidate.device == "cpu" or cuda_available():
        paths = [fp32_path, candidate.path]
        measured = compare_latency(paths, feeds, policy.latency_runs, candidate.device)
        if measured is not None:
            fp32_ms, latency = measured
    drop = (base_accuracy - metrics["accuracy"]) * 100
    speedup = None if latency is None else fp32_ms / latency
    kept, reason = decide(candidate.device, drop, speedup, policy)
    log.info(
        "%s %s (%s): accuracy drop %.2f points: %s",
        component,
        candidate.precision,
        candidate.method,
        drop,
        reason,
    )
    return VariantReport(
        precision=candidate.precision,
        method=candidate.method,
        device=candidate.device,
        kept=kept,
        reason=reason,
        file=candidate.path.name if kept else None,
        bytes=candidate.path.stat().st_size,
        val_accuracy=metrics["accuracy"],
        fp32_val_accuracy=base_accuracy,
        accuracy_drop_points=drop,
        val_subsets={k: v["accuracy"] for k, v in metrics["subsets"].items()},
        latency_ms=latency,
        fp32_latency_ms=fp32_ms if latency is not None else None,
        speedup=speedup,
    )
