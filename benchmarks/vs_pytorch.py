"""polysense runtime vs PyTorch eager on the same weights and inputs, measured side by side in ONE process.

    python benchmarks/vs_pytorch.py --run runs/demo      (or: make bench-pytorch)

Measures, batch 1, on real test-split samples of the run: encoders + fusion (preprocessed inputs) and end to end
from files (preprocessing included on both sides; PyTorch gets the very same numpy preprocessing), for PyTorch
eager, the runtime at fp32, the runtime with each kept int8 variant, and the runtime at precision "auto".
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

import numpy as np
import torch

import polysense
from polysense.bench import BenchOptions, bundle_sizes, measure, run_bench
from polysense.bundle import encoder_name, open_bundle
from polysense.data import read_manifest
from polysense.models.train import load_trained

ROOT = Path(__file__).resolve().parents[1]


def torch_forward(model, pipeline: polysense.Pipeline, features: dict[str, np.ndarray]) -> torch.Tensor:
    """Logits of the torch model for one sample's preprocessed features (batch 1)."""
    embeddings = []
    for modality in model.config.modalities:
        feature = torch.from_numpy(features[modality])[None]
        encoder = model.encoders[modality]
        if modality == "image":
            embeddings.append(encoder(feature))
        elif modality == "text":
            embeddings.append(encoder(feature, torch.ones_like(feature)))
        else:
            embeddings.append(encoder(feature)[0])
    mask = torch.ones(1, len(embeddings))
    return model.fusion(torch.stack(embeddings, dim=1), mask)


def runtime_forward(pipeline: polysense.Pipeline, features: dict[str, np.ndarray]) -> np.ndarray:
    embeddings = {m: pipeline.encode(m, [features[m]]) for m in pipeline.modalities}
    return pipeline.fuse(embeddings, np.ones((1, len(pipeline.modalities)), np.float32))


def run(run_dir: Path, bundle: Path, options: BenchOptions) -> dict:
    model, _ = load_trained(run_dir)
    row = [r for r in read_manifest(run_dir / "manifest.csv").rows if r.split == "test"][0]
    sample = {m: getattr(row, m) for m in model.config.modalities}
    fp32 = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    auto = polysense.Pipeline.load(bundle, device="cpu")
    features = {m: fp32.preprocess(m, v) for m, v in sample.items()}
    results: dict[str, dict] = {}
    with torch.inference_mode():
        results["pytorch_eager"] = {
            "models": measure(lambda: torch_forward(model, fp32, features), options),
            "end_to_end": measure(
                lambda: torch_forward(model, fp32, {m: fp32.preprocess(m, v) for m, v in sample.items()}),
                options,
            ),
        }
    for name, pipeline in (("runtime_fp32", fp32), ("runtime_auto", auto)):
        results[name] = {
            "models": measure(lambda p=pipeline: runtime_forward(p, features), options),
            "end_to_end": measure(lambda p=pipeline: p.predict(**sample), options),
            "precisions": pipeline.precisions,
        }
    opened = open_bundle(bundle)
    int8 = {}
    for component in opened.manifest["components"]:
        variants = {v["precision"]: v for v in opened.component(component).get("variants", [])}
        entry = {"kept": "int8" in opened.precisions(component), "export_measurement": variants.get("int8")}
        if entry["kept"]:
            single = polysense.Pipeline.load(bundle, device="cpu", precision={component: "int8"})
            modality = next((m for m in single.modalities if encoder_name(m) == component), None)
            if modality:
                run_int8 = lambda p=single, m=modality: p.encode(m, [features[m]])  # noqa: E731
                run_fp32 = lambda m=modality: fp32.encode(m, [features[m]])  # noqa: E731
            else:
                embeddings = {m: fp32.encode(m, [features[m]]) for m in fp32.modalities}
                mask = np.ones((1, len(fp32.modalities)), np.float32)
                run_int8 = lambda p=single, e=embeddings, k=mask: p.fuse(e, k)  # noqa: E731
                run_fp32 = lambda e=embeddings, k=mask: fp32.fuse(e, k)  # noqa: E731
            entry["fp32"] = measure(run_fp32, options)
            entry["int8"] = measure(run_int8, options)
            entry["speedup"] = entry["fp32"]["p50_ms"] / entry["int8"]["p50_ms"]
        int8[component] = entry
    results["int8_variants"] = int8
    bench = run_bench(bundle, options, progress=False)
    eager, best = results["pytorch_eager"], results["runtime_auto"]
    results["ratios"] = {
        "models_auto_vs_eager": eager["models"]["p50_ms"] / best["models"]["p50_ms"],
        "end_to_end_auto_vs_eager": eager["end_to_end"]["p50_ms"] / best["end_to_end"]["p50_ms"],
        "models_fp32_vs_eager": eager["models"]["p50_ms"] / results["runtime_fp32"]["models"]["p50_ms"],
        "orchestration_overhead_share": bench["orchestration_overhead_share"],
        "cold_start_seconds": bench["cold_start"]["seconds"],
        "int8_bundle_share_of_fp32": bundle_sizes(bundle, auto.precisions)["int8"]
        / bundle_sizes(bundle, auto.precisions)["fp32"],
    }
    results["bench"] = bench
    return results


def markdown(results: dict, meta: dict) -> str:
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
        f"| encoders + fusion, auto vs eager | {r['models_auto_vs_eager']:.2f}x faster | >= 4x |",
        f"| end to end from files, auto vs eager | {r['end_to_end_auto_vs_eager']:.2f}x faster | >= 3x |",
        f"| orchestration overhead share of end to end | {r['orchestration_overhead_share'] * 100:.1f} % | <= 5 % |",
        f"| cold start (import + load + first prediction) | {r['cold_start_seconds']:.3f} s | <= 0.5 s |",
        f"| int8 bundle bytes / fp32 bundle bytes | {r['int8_bundle_share_of_fp32'] * 100:.0f} % | <= 35 % |",
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
    args = parser.parse_args()
    options = BenchOptions.quick(batch_sizes=(1, 2)) if args.quick else BenchOptions()
    results = run(Path(args.run), Path(args.bundle or Path(args.run) / "bundle"), options)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": "make bench-pytorch",
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
