"""int8 against fp32 for the fine-tuned MiniLM-L6 text encoder at SST-2 lengths, at batch 1.

    python benchmarks/sst2_int8.py     (needs runs/sst2_bench/minilm_finetuned/bundle: make bench-sst2 first)

The 872 dev sentences are tokenized by the bundle's own preprocessing, so each runs at its real length. Each
measurement is a fresh process that opens one graph (fp32 or int8) with the runtime's own session settings
(`polysense.sessions.Session`: no spinning threads, no memory arena), warms up on 20 sentences, then times every
sentence once; it reports the median. A text-only application runs exactly one such session, so nothing else
competes for the cores or caches. fp32 and int8 processes alternate, ROUNDS rounds each (the order flips every
round), at 1 intra-op thread and at onnxruntime's default (one per core); the speed-up is the median over rounds
of fp32 over the median of int8. Results: benchmarks/results/sst2_int8.{json,md}, with the CPU's instruction sets
(int8 kernels differ by CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "runs" / "sst2_bench" / "minilm_finetuned" / "bundle"
MANIFEST = ROOT / "runs" / "sst2_bench" / "data" / "manifest.csv"
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/sst2_int8.py"
ROUNDS = 3
WARMUP = 20


def measure(graph: Path, ids_file: Path, threads: int) -> float:
    """In this process: median ms per sentence of one graph at batch 1."""
    from polysense.sessions import Session, SessionSettings

    session = Session(graph, SessionSettings(device="cpu", intra_op_threads=threads))
    rows = list(np.load(ids_file, allow_pickle=True))
    feeds = [{"ids": row[None], "mask": np.ones((1, row.size), np.int64)} for row in rows]
    for feed in feeds[:WARMUP]:
        session.run(feed)
    times = []
    for feed in feeds:
        start = time.perf_counter()
        session.run(feed)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def measure_apart(graph: Path, ids_file: Path, threads: int) -> float:
    command = [
        sys.executable,
        __file__,
        "--measure",
        str(graph),
        "--ids",
        str(ids_file),
        "--threads",
        str(threads),
    ]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


def dev_ids(pipe) -> np.ndarray:
    with MANIFEST.open(newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle) if row["split"] == "test"]
    ids = np.empty(len(texts), dtype=object)
    ids[:] = [pipe.prepare({"text": t}).features["text"] for t in texts]
    return ids


def main() -> None:
    import polysense
    from polysense.machine import machine

    if not BUNDLE.is_dir():
        raise SystemExit(f"{BUNDLE} is missing: run make bench-sst2 first")
    pipe = polysense.Pipeline.load(BUNDLE, device="cpu", precision="fp32")
    component = pipe.description.component("text_encoder")
    graphs = {p: BUNDLE / component.variant(p).file for p in ("fp32", "int8")}
    ids = dev_ids(pipe)
    del pipe  # its sessions and their thread pools need not stay alive beside the measuring processes
    report = {"command": COMMAND, "machine": machine(), "sentences": len(ids), "rounds": ROUNDS}
    report["tokens_median"] = float(np.median([len(i) for i in ids]))
    with tempfile.TemporaryDirectory() as folder:
        ids_file = Path(folder) / "ids.npy"
        np.save(ids_file, ids, allow_pickle=True)
        for threads in (1, 0):
            runs: dict[str, list[float]] = {"fp32": [], "int8": []}
            for round_ in range(ROUNDS):
                for precision in ("fp32", "int8") if round_ % 2 == 0 else ("int8", "fp32"):
                    runs[precision].append(measure_apart(graphs[precision], ids_file, threads))
            medians = {p: statistics.median(r) for p, r in runs.items()}
            report[f"threads_{threads or 'default'}"] = {
                **medians,
                "rounds_ms": runs,
                "int8_speedup": medians["fp32"] / medians["int8"],
            }
            print(f"threads {threads or 'default'}: {runs}", flush=True)
    write(report)


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sst2_int8.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# MiniLM-L6 text encoder on SST-2 dev: int8 vs fp32",
        "",
        f"Command: `{COMMAND}`. Machine: {report['machine']['cpus']} CPUs, {'/'.join(report['machine']['isa'])}.",
        f"{report['sentences']} dev sentences at batch 1 (median {report['tokens_median']:.0f} tokens), medians per "
        f"sentence; each figure is the median of {report['rounds']} fresh processes, fp32 and int8 alternating.",
        "",
        "| intra-op threads | fp32 ms | int8 ms | int8 speed-up |",
        "|---|---|---|---|",
    ]
    for key, label in (("threads_1", "1"), ("threads_default", "default (one per core)")):
        entry = report[key]
        lines.append(
            f"| {label} | {entry['fp32']:.2f} | {entry['int8']:.2f} | {entry['int8_speedup']:.2f}x |"
        )
    (RESULTS / "sst2_int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        print(measure(arguments.measure, arguments.ids, arguments.threads))
    else:
        main()
