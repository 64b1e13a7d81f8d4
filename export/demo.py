"""`polysense demo`, the main job end to end: built-in data -> training -> ONNX bundle -> runtime evaluation
-> a short benchmark -> predictions from files. It lives in export because it uses all three packages."""

from __future__ import annotations

import argparse
from pathlib import Path

import polysense
from polysense.export import export_run
from polysense.models.training.options import TrainOptions
from polysense.models.training.train import TrainResult, train
from polysense.tools.bench import BenchOptions, format_report, run_bench
from polysense.tools.evaluate import evaluate_bundle
from polysense.tools.manifest import read_manifest
from polysense.tools.metrics import format_metrics_table


def run_demo(args: argparse.Namespace) -> int:
    """args: out (run folder, must not exist), n (built-in samples), no_progress."""
    run_dir = Path(args.out)
    progress = not args.no_progress
    print(f"== 1/5 train on the built-in data ({args.n} samples) -> {run_dir}")
    options = TrainOptions(data="builtin", out=str(run_dir), builtin_n=args.n, progress=progress)
    result = train(options)
    print(f"torch, test split (best epoch {result.best_epoch} of {result.epochs_run}):")
    print(result.table())

    bundle = run_dir / "bundle"
    print(f"\n== 2/5 export each encoder and the fusion head to ONNX -> {bundle}")
    report = export_run(run_dir, bundle, progress=progress)
    print(f"end to end: max |probability difference| torch vs runtime {report.end_to_end:.1e}")
    print(report.variants_table())

    pipeline = _evaluate_with_runtime(run_dir, bundle, result, progress)

    print("\n== 4/5 a short benchmark of the bundle at precision auto (polysense bench, fewer runs)")
    quick = BenchOptions(
        window_runs=20, max_windows=5, batch_sizes=(1, 8, 32), throughput_seconds=0.2, cold_start_runs=1
    )
    print(format_report(run_bench(bundle, quick, progress=progress)))

    print("\n== 5/5 three predictions from files")
    _print_predictions(pipeline, run_dir)
    return 0


def _evaluate_with_runtime(
    run_dir: Path, bundle: Path, result: TrainResult, progress: bool
) -> polysense.Pipeline:
    """Step 3: the bundle's test accuracy at fp32 (equal to torch's) and at precision auto; returns the
    precision-auto pipeline."""
    print("\n== 3/5 evaluate the bundle on the test split with the runtime alone (fp32)")
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    metrics = evaluate_bundle(pipeline, run_dir / "manifest.csv", split="test", progress=progress)
    print(format_metrics_table(metrics))
    same = "equal to" if metrics["accuracy"] == result.metrics["accuracy"] else "DIFFERENT from"
    print(
        f"runtime test accuracy {metrics['accuracy']:.4f} is {same} torch's {result.metrics['accuracy']:.4f}"
    )
    pipeline = polysense.Pipeline.load(bundle, device="cpu")  # precision="auto"
    chosen = evaluate_bundle(pipeline, run_dir / "manifest.csv", split="test", progress=progress)
    picks = ", ".join(f"{name} {precision}" for name, precision in pipeline.precisions.items())
    print(f"precision auto on this CPU: {picks}; test accuracy {chosen['accuracy']:.4f}")
    return pipeline


def _print_predictions(pipeline: polysense.Pipeline, run_dir: Path, count: int = 3) -> None:
    rows = [r for r in read_manifest(run_dir / "manifest.csv").rows if r.split == "test"][:count]
    for row in rows:
        prediction = pipeline.predict(image=row.image, text=row.text, audio=row.audio)
        print(f"  {Path(row.image).name} + {Path(row.audio).name} + {row.text!r}")
        print(
            f"    -> {prediction.label} (p={prediction.probabilities[prediction.label]:.3f}; true {row.label}; "
            f"{prediction.timings['total']:.1f} ms)"
        )
