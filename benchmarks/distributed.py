"""Training throughput in one and two processes (`polysense train --nproc`), side by side in one run.

    python benchmarks/distributed.py [--n 3000] [--epochs 12]        (make bench-distributed, ~10 minutes)

The same training (the built-in set, every option at its default; --patience 0 so every run trains all its
epochs), three times:

    1 process, torch's default threads (one per core)      what `polysense train` does today
    1 process, 1 thread                                      what each of two processes gets on two cores
    2 processes (gloo), 1 thread each                        `polysense train --nproc 2`

Throughput is training samples per second of the training passes, read from each epoch's log line (validation,
BatchNorm re-estimation and checkpoints excluded; they run in every process alike), median over the epochs;
wall time is the whole command (data preprocessing included). The test metrics of the three runs are compared
too: the two-process run must match the one-process runs. Results: benchmarks/results/distributed.{json,md},
with the CPU's instruction sets.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "bench_distributed"
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/distributed.py"
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ \w+: train loss [\d.]+ \(([\d.]+) samples/s in (\d+) process")
RUNS = {
    "1 process, default threads": (1, None),
    "1 process, 1 thread": (1, "1"),
    "2 processes, 1 thread each": (2, "1"),
}


def train(manifest: Path, out: Path, processes: int, threads: str | None, epochs: int) -> dict:
    """One `polysense train` run: its epochs' samples/s, wall time and test metrics."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = threads
    command = [sys.executable, "-m", "polysense", "train", "--data", str(manifest), "--out", str(out)]
    command += ["--epochs", str(epochs), "--patience", "0", "--no-progress", "--nproc", str(processes)]
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rates = [float(m.group(2)) for m in map(EPOCH_LINE.match, done.stderr.splitlines()) if m]
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "processes": processes,
        "threads": threads or "default",
        "samples_per_second_by_epoch": rates,
        "samples_per_second": statistics.median(rates),
        "wall_seconds": wall,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_subsets": {name: s["accuracy"] for name, s in metrics["subsets"].items()},
    }


def main() -> None:
    from polysense.datasets.builtin import BuiltinSpec, write_builtin
    from polysense.machine import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--n", type=int, default=3000, help="built-in samples (default 3000, train's default)"
    )
    parser.add_argument("--epochs", type=int, default=12, help="epochs of each run (default 12, train's)")
    args = parser.parse_args()
    data = WORK / f"data_{args.n}"
    manifest = data / "manifest.csv"
    if not manifest.is_file():
        write_builtin(data, BuiltinSpec(n=args.n), progress=False)
    report = {"command": COMMAND, "machine": machine(), "n": args.n, "epochs": args.epochs, "runs": {}}
    for index, (name, (processes, threads)) in enumerate(RUNS.items()):
        out = WORK / f"run_{index}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        report["runs"][name] = train(manifest, out, processes, threads, args.epochs)
        print(f"{name}: {report['runs'][name]['samples_per_second']:.1f} samples/s", flush=True)
    runs = list(report["runs"].values())
    default, one_thread, two = runs
    report["speedup_vs_1_process"] = two["samples_per_second"] / default["samples_per_second"]
    # Two processes against two copies of the one-thread process: how much of the second core is put to use.
    report["scaling_efficiency"] = two["samples_per_second"] / (2 * one_thread["samples_per_second"])
    report["same_test_metrics"] = all(
        (r["test_accuracy"], r["test_macro_f1"]) == (default["test_accuracy"], default["test_macro_f1"])
        for r in runs
    )
    # With a modality missing the built-in label is undetermined (it combines all three), so those predictions
    # are near-ties the last float bits decide: the thread count alone moves them as much.
    report["subset_accuracy_gap"] = {
        "2 processes vs 1 process": _largest_gap(two, default),
        "1 thread vs default threads (1 process)": _largest_gap(one_thread, default),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "distributed.md").write_text(markdown(report))
    print(markdown(report))


def _largest_gap(run: dict, other: dict) -> float:
    return max(abs(run["test_subsets"][name] - other["test_subsets"][name]) for name in run["test_subsets"])


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [
        "# Distributed training: one process against two (gloo, CPU)",
        "",
        f"Command: `{report['command']}`. Machine: {info['cpus']} CPUs, {'/'.join(info['isa'])}.",
        f"Built-in set of {report['n']} samples, {report['epochs']} epochs (`--patience 0`), every other option "
        "at its default (batch 64 over all processes). Samples/s: median over the epochs of the training passes "
        "alone.",
        "",
        "| run | samples/s | by epoch | wall s | test accuracy | test macro F1 |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, run in report["runs"].items():
        by_epoch = ", ".join(f"{rate:.0f}" for rate in run["samples_per_second_by_epoch"])
        lines.append(
            f"| {name} | {run['samples_per_second']:.1f} | {by_epoch} | {run['wall_seconds']:.0f} | "
            f"{run['test_accuracy']:.4f} | {run['test_macro_f1']:.4f} |"
        )
    lines += [
        "",
        f"- Two processes against one (default threads): **{report['speedup_vs_1_process']:.2f}x**.",
        f"- Scaling efficiency (two processes against twice one single-thread process): "
        f"**{report['scaling_efficiency']:.0%}**.",
        f"- Same test metrics (accuracy and macro F1 with every modality) in all runs: "
        f"**{'yes' if report['same_test_metrics'] else 'no'}**.",
        "- Largest accuracy gap on a subset with a modality missing (the built-in label needs all three, so "
        "these are near-ties decided by float rounding): "
        + "; ".join(f"{name} {gap:.4f}" for name, gap in report["subset_accuracy_gap"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
