"""`polysense bench BUNDLE`: latency per stage and end to end, throughput, cold start, memory and size.

Runtime only (no torch), public Pipeline API only. Latency is measured in windows of runs, repeated until
two consecutive windows agree on the median within a tolerance (as Triton's perf_analyzer does); when they
never agree the report says so.
Stage latencies (preprocess, encode, fusion) are the pipeline's own timings inside those end-to-end runs.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from polysense.bundle.reader import open_bundle
from polysense.bundle.schema import PRECISIONS
from polysense.inference.pipeline import Pipeline
from polysense.inference.predictor import EmbeddingsT, Predictor, PreparedT
from polysense.machine import machine
from polysense.modalities import SPECS

MODELS_STAGE = "encoders + fusion"  # per run, the sum of the encode_* stages and the fusion


@dataclass(frozen=True)
class BenchOptions:
    device: str = "cpu"
    precision: str = "auto"
    threads: int = 0  # onnxruntime threads per model run (0: one per core)
    warmup_runs: int = 20
    window_runs: int = 50  # runs per measurement window
    max_windows: int = 10  # give up on stability after this many windows
    tolerance: float = 0.05  # consecutive windows agree when their medians differ by at most 5 %
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    throughput_seconds: float = 0.5  # per batch size
    cold_start_runs: int = 3

    @classmethod
    def quick(cls, **overrides: Any) -> BenchOptions:
        """Few runs: a smoke test of the whole report, not a measurement. `overrides`: any fields, by name
        (checked by `dataclasses.replace`)."""
        few = cls(
            warmup_runs=2,
            window_runs=5,
            max_windows=3,
            batch_sizes=(1, 4),
            throughput_seconds=0.05,
            cold_start_runs=1,
        )
        return replace(few, **overrides)


def _stats(times_ms: list[float]) -> dict:
    array = np.asarray(times_ms)
    return {
        "p50_ms": float(np.percentile(array, 50)),
        "p90_ms": float(np.percentile(array, 90)),
        "p99_ms": float(np.percentile(array, 99)),
        "mean_ms": float(array.mean()),
        "runs": int(array.size),
    }


def measure(run: Callable[[], object], options: BenchOptions) -> dict:
    """Warm up, then measure windows until two consecutive medians agree within the tolerance."""
    for _ in range(options.warmup_runs):
        run()
    windows: list[list[float]] = []
    stable = False
    while len(windows) < options.max_windows:
        window = []
        for _ in range(options.window_runs):
            start = time.perf_counter()
            run()
            window.append((time.perf_counter() - start) * 1000)
        windows.append(window)
        if len(windows) >= 2:
            previous, current = statistics.median(windows[-2]), statistics.median(windows[-1])
            if abs(current - previous) <= options.tolerance * previous:
                stable = True
                break
    result = _stats(windows[-2] + windows[-1] if len(windows) >= 2 else windows[-1])
    result.update(stable=stable, windows=len(windows))
    return result


def _sample_files(pipeline: Predictor[PreparedT, EmbeddingsT], folder: Path) -> dict:
    """One input per modality of the bundle, as files where the modality has files (what users pass)."""
    rng = np.random.default_rng(0)
    return {m: SPECS[m].codec.sample_input(folder, rng) for m in pipeline.modalities}


def _cold_start(bundle: Path, sample: dict, options: BenchOptions) -> dict:
    """import polysense + load + first prediction in a fresh process, and that process's peak RSS."""
    code = (
        "import time, resource, json\n"
        "start = time.perf_counter()\n"
        "import polysense\n"
        f"pipe = polysense.Pipeline.load({str(bundle)!r}, device={options.device!r}, precision={options.precision!r}, "
        f"intra_op_threads={options.threads!r})\n"
        f"pipe.predict(**{sample!r})\n"
        "elapsed = time.perf_counter() - start\n"
        "from polysense.tools.bench import peak_rss_mb\n"
        "print(json.dumps({'seconds': elapsed, 'peak_rss_mb': peak_rss_mb()}))\n"
    )
    runs = []
    for _ in range(options.cold_start_runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "runs": len(runs),
    }


def bundle_sizes(bundle: Path, chosen: dict[str, str]) -> dict:
    """Bytes of the component files per precision (fp32 standing in where a component lacks a variant),
    and of the set `auto` (or the forced precision) loads."""
    components = open_bundle(bundle).description.components
    sizes = {}
    for precision in PRECISIONS:
        sizes[precision] = sum(
            c.variants.get(precision, c.variants["fp32"]).bytes for c in components.values()
        )
    sizes["loaded"] = sum(c.variant(chosen[name]).bytes for name, c in components.items())
    return sizes


def stage_latencies(
    pipeline: Predictor[PreparedT, EmbeddingsT], sample: dict, options: BenchOptions
) -> tuple[dict, dict, float]:
    """End-to-end latency of predict(**sample), each stage's latency as the pipeline timed it inside those
    same runs, and the median orchestration overhead (end to end minus the stages) in ms."""
    timings: list[dict] = []
    end_to_end = measure(lambda: timings.append(pipeline.predict(**sample).timings), options)
    recent = timings[-end_to_end["runs"] :]
    stability = {"stable": end_to_end["stable"], "windows": end_to_end["windows"]}
    stages = {
        name: {**_stats([t[name] for t in recent]), **stability} for name in recent[0] if name != "total"
    }
    models = [sum(v for k, v in t.items() if k.startswith("encode_") or k == "fusion") for t in recent]
    stages[MODELS_STAGE] = {**_stats(models), **stability}
    parts = [sum(v for k, v in t.items() if k != "total") for t in recent]  # the stages, each counted once
    overhead = statistics.median(t["total"] - p for t, p in zip(recent, parts))
    return end_to_end, stages, overhead


def _throughput(
    pipeline: Predictor[PreparedT, EmbeddingsT], sample: dict, options: BenchOptions
) -> dict[str, float]:
    throughput = {}
    for batch in options.batch_sizes:
        samples = [sample] * batch
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < options.throughput_seconds or count == 0:
            pipeline.predict_batch(samples)
            count += batch
        throughput[str(batch)] = count / (time.perf_counter() - start)
    return throughput


def run_bench(
    bundle: str | os.PathLike, options: BenchOptions = BenchOptions(), progress: bool = True
) -> dict:
    bundle = Path(bundle)
    pipeline = Pipeline.load(
        bundle, device=options.device, precision=options.precision, intra_op_threads=options.threads
    )
    steps = tqdm(total=3, desc="bench", unit="step", disable=not progress, leave=False)
    with tempfile.TemporaryDirectory() as folder:
        sample = _sample_files(pipeline, Path(folder))
        end_to_end, stages, overhead = stage_latencies(pipeline, sample, options)
        steps.update()
        throughput = _throughput(pipeline, sample, options)
        steps.update()
        cold = _cold_start(bundle, sample, options)
        steps.update()
    steps.close()
    return {
        "bundle": str(bundle),
        "options": asdict(options),
        "providers": pipeline.providers,
        "precisions": pipeline.precisions,
        "stages": stages,
        "end_to_end": end_to_end,
        "orchestration_overhead_ms": overhead,
        "orchestration_overhead_share": overhead / end_to_end["p50_ms"],
        "throughput_samples_per_s": throughput,
        "cold_start": cold,
        "peak_rss_mb": peak_rss_mb(),
        "bundle_bytes": bundle_sizes(bundle, pipeline.precisions),
        "machine": machine(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM, which is its own (ru_maxrss would carry over the parent's
    peak across fork + exec) and which `reset_peak_rss` can reset."""
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now, in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return 0.0


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux: "5" into /proc/self/clear_refs), so the next `peak_rss_mb`
    measures only what follows. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def format_report(report: dict) -> str:
    lines = [f"{report['bundle']}: {', '.join(f'{k} {v}' for k, v in report['precisions'].items())}", ""]
    lines.append(f"{'stage':<20} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}  stable")
    rows = [*report["stages"].items(), ("end to end", report["end_to_end"])]
    for name, s in rows:
        flag = "yes" if s["stable"] else f"NO ({s['windows']} windows never agreed)"
        lines.append(
            f"{name:<20} {s['p50_ms']:8.3f} {s['p90_ms']:8.3f} {s['p99_ms']:8.3f} {s['mean_ms']:8.3f}  {flag}"
        )
    lines.append("")
    share = report["orchestration_overhead_share"] * 100
    lines.append(
        f"orchestration overhead: {report['orchestration_overhead_ms']:.3f} ms ({share:.1f}% of end to end)"
    )
    lines.append(
        "throughput (samples/s): "
        + ", ".join(f"batch {b}: {v:.0f}" for b, v in report["throughput_samples_per_s"].items())
    )
    cold = report["cold_start"]
    lines.append(
        f"cold start (import + load + first prediction): {cold['seconds']:.3f} s, "
        f"peak RSS {cold['peak_rss_mb']:.0f} MB"
    )
    sizes = report["bundle_bytes"]
    lines.append("bundle bytes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    return "\n".join(lines)


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """Stage latencies and throughput as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        from polysense.errors import DependencyError

        raise DependencyError(f"--plot needs matplotlib ({error}); pip install 'polysense[plot]'") from error
    stages = {**report["stages"], "end to end": report["end_to_end"]}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(stages)
    left.barh(names, [stages[n]["p50_ms"] for n in names], label="p50")
    left.errorbar([stages[n]["p99_ms"] for n in names], names, fmt="|", color="black", label="p99")
    left.set_xlabel("ms (batch 1)")
    left.invert_yaxis()
    left.legend()
    batches = list(report["throughput_samples_per_s"])
    right.plot([int(b) for b in batches], list(report["throughput_samples_per_s"].values()), marker="o")
    right.set_xscale("log", base=2)
    right.set_xlabel("batch size")
    right.set_ylabel("samples / s")
    figure.suptitle(f"polysense bench: {', '.join(f'{k} {v}' for k, v in report['precisions'].items())}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
