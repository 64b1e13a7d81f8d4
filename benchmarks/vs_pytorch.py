"""polysense runtime vs PyTorch eager on the same weights and inputs, measured side by side in ONE process.

    python benchmarks/vs_pytorch.py --run runs/demo      (or: make bench-pytorch)
    make bench-pytorch-pretrained                        (the pretrained tri-modal model: results/pretrained/)

Measures, batch 1, on real test-split samples of the run: encoders + fusion (preprocessed inputs) and end to end
from files (preprocessing included on both sides; PyTorch gets the very same numpy preprocessing), for PyTorch
eager, the runtime at fp32, the runtime with each kept int8 variant, and the runtime at precision "auto". The
runtime is measured through its public API only: encoders + fusion is the sum of the encode and fusion stages
that Pipeline.predict times inside the same end-to-end runs.
Writes results/vs_pytorch.json, .md and .png. Latency statistics come from polysense.bench.measure (windows
repeated until two consecutive medians agree within 5 %).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch

import polysense
from polysense.bench import (
    MODELS_STAGE,
    BenchOptions,
    bundle_sizes,
    machine,
    measure,
    run_bench,
    stage_latencies,
)
from polysense.bundle import open_bundle
from polysense.data import read_manifest
from polysense.export.reference import torch_logits
from polysense.models.run_folder import load_trained
from polysense.preprocessing import build_preprocessors

ROOT = Path(__file__).resolve().parents[1]
# The targets each model was given: the demo's (issue 5) and the pretrained tri-modal model's (issue 11).
TARGETS = {
    "demo": {
        "models": ">= 4x",
        "end_to_end": ">= 3x",
        "overhead": "<= 5 %",
        "cold_start": "<= 0.5 s",
        "bytes": "<= 35 %",
    },
    "pretrained": {
        "models": ">= 3.5x",
        "end_to_end": "-",
        "overhead": "-",
        "cold_start": "<= 1 s",
        "bytes": "<= 40 %",
    },
}


def _component_stage(description, component: str) -> str:
    """The Prediction.timings key of a component: encode_<modality>, or fusion."""
    modality = description.component(component).modality
    return "fusion" if modality is None else f"encode_{modality}"


def _runtime(pipeline: polysense.Pipeline, sample: dict, options: BenchOptions) -> dict:
    """Encoders + fusion and end to end, both from the same predict() runs (the pipeline's own stage timings)."""
    end_to_end, stages, _ = stage_latencies(pipeline, sample, options)
    return {
        "models": stages[MODELS_STAGE],
        "end_to_end": end_to_end,
        "stages": stages,
        "precisions": pipeline.precisions,
    }


def _int8_variants(bundle: Path, sample: dict, options: BenchOptions, fp32: dict) -> dict:
    """Each component's kept int8 variant against fp32, measured as that component's stage inside predict()."""
    description = open_bundle(bundle).description
    int8 = {}
    for name, component in description.components.items():
        measured = {v["precision"]: v for v in component.measurements}
        entry = {"kept": "int8" in component.variants, "export_measurement": measured.get("int8")}
        if entry["kept"]:
            single = polysense.Pipeline.load(bundle, device="cpu", precision={name: "int8"})
            stage = _component_stage(description, name)
            entry["fp32"] = fp32["stages"][stage]
            entry["int8"] = _runtime(single, sample, options)["stages"][stage]
            entry["speedup"] = entry["fp32"]["p50_ms"] / entry["int8"]["p50_ms"]
        int8[name] = entry
    return int8


def run(run_dir: Path, bundle: Path, options: BenchOptions) -> dict:
    model, _ = load_trained(run_dir)
    row = [r for r in read_manifest(run_dir / "manifest.csv").rows if r.split == "test"][0]
    sample = {m: getattr(row, m) for m in model.config.modalities}
    fp32 = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    auto = polysense.Pipeline.load(bundle, device="cpu")
    preprocessors = build_preprocessors(fp32.description.preprocessing, fp32.modalities, bundle)
    features = {m: preprocessors[m](v) for m, v in sample.items()}
    results: dict[str, dict] = {}
    with torch.inference_mode():
        results["pytorch_eager"] = {
            "models": measure(lambda: torch_logits(model, features), options),
            "end_to_end": measure(
                lambda: torch_logits(model, {m: preprocessors[m](v) for m, v in sample.items()}), options
            ),
        }
    results["runtime_fp32"] = _runtime(fp32, sample, options)
    results["runtime_auto"] = _runtime(auto, sample, options)
    results["int8_variants"] = _int8_variants(bundle, sample, options, results["runtime_fp32"])
    bench = run_bench(bundle, options, progress=False)
    eager, best = results["pytorch_eager"], results["runtime_auto"]
    sizes = bundle_sizes(bundle, auto.precisions)
    results["ratios"] = {
        "models_auto_vs_eager": eager["models"]["p50_ms"] / best["models"]["p50_ms"],
        "end_to_end_auto_vs_eager": eager["end_to_end"]["p50_ms"] / best["end_to_end"]["p50_ms"],
        "models_fp32_vs_eager": eager["models"]["p50_ms"] / results["runtime_fp32"]["models"]["p50_ms"],
        "orchestration_overhead_share": bench["orchestration_overhead_share"],
        "cold_start_seconds": bench["cold_start"]["seconds"],
        "int8_bundle_share_of_fp32": sizes["int8"] / sizes["fp32"],
    }
    results["bench"] = bench
    return results


def markdown(results: dict, meta: dict) -> str:
    t = TARGETS[meta.get("targets", "demo")]
    r = results["ratios"]
    lines = [
        f"# polysense runtime vs PyTorch eager ({meta['machine']}, batch 1, same weights and inputs, one process)",
        "",
        f"Command: `{meta['command']}`; torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
        f"torch threads {meta['torch_threads']}.",
        "",
        "| engine | encoders + fusion p50 (p99) ms | end to end from files p50 (p99) ms |",
        "|---|---:|---:|",
    ]
    for name in ("pytorch_eager", "runtime_fp32", "runtime_auto"):
        m, e = results[name]["models"], results[name]["end_to_end"]
        label = name + (
            f" ({', '.join(f'{k} {v}' for k, v in results[name]['precisions'].items())})"
            if "precisions" in results[name]
            else ""
        )
        lines.append(
            f"| {label} | {m['p50_ms']:.3f} ({m['p99_ms']:.3f}) | {e['p50_ms']:.3f} ({e['p99_ms']:.3f}) |"
        )
    lines += [
        "",
        "| int8 variant | kept at export | speed vs fp32 here | accuracy drop at export (points) |",
        "|---|---|---:|---:|",
    ]
    for component, entry in results["int8_variants"].items():
        measured = entry.get("export_measurement") or {}
        speed = (
            f"{entry['speedup']:.2f}x"
            if "speedup" in entry
            else (f"{measured['speedup']:.2f}x (export)" if measured else "n/a")
        )
        drop = f"{measured['accuracy_drop_points']:.2f}" if measured else "n/a"
        lines.append(f"| {component} | {'yes' if entry['kept'] else 'no'} | {speed} | {drop} |")
    lines += [
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| encoders + fusion, auto vs eager | {r['models_auto_vs_eager']:.2f}x faster | {t['models']} |",
        f"| end to end from files, auto vs eager | {r['end_to_end_auto_vs_eager']:.2f}x faster | {t['end_to_end']} |",
        f"| orchestration overhead share of end to end | {r['orchestration_overhead_share'] * 100:.1f} % "
        f"| {t['overhead']} |",
        f"| cold start (import + load + first prediction) | {r['cold_start_seconds']:.3f} s | {t['cold_start']} |",
        f"| int8 bundle bytes / fp32 bundle bytes | {r['int8_bundle_share_of_fp32'] * 100:.0f} % | {t['bytes']} |",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["pytorch_eager", "runtime_fp32", "runtime_auto"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, key, title in (
        (axes[0], "models", "encoders + fusion"),
        (axes[1], "end_to_end", "end to end from files"),
    ):
        values = [results[n][key]["p50_ms"] for n in names]
        axis.bar(names, values, color=["#999999", "#4c72b0", "#55a868"])
        axis.set_title(f"{title} (batch 1, p50)")
        axis.set_ylabel("ms")
        for index, value in enumerate(values):
            axis.text(index, value, f"{value:.2f}", ha="center", va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default=str(ROOT / "runs" / "demo"), help="finished training run")
    parser.add_argument("--bundle", help="its bundle (default RUN/bundle)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="few runs: a smoke test, not a measurement")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="demo", help="which targets to print")
    parser.add_argument(
        "--command", default="make bench-pytorch", help="the command to record in the results"
    )
    args = parser.parse_args()
    options = BenchOptions.quick(batch_sizes=(1, 2)) if args.quick else BenchOptions()
    results = run(Path(args.run), Path(args.bundle or Path(args.run) / "bundle"), options)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {'/'.join(machine()['isa']) or 'no AVX2'}",
        "command": args.command,
        "targets": args.targets,
        "torch": torch.__version__,
        "onnxruntime": importlib.metadata.version("onnxruntime"),
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_pytorch.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "vs_pytorch.md").write_text(markdown(results, meta))
    plot(results, out / "vs_pytorch.png")
    print(markdown(results, meta))


if __name__ == "__main__":
    main()
