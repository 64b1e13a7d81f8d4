"""int8 against fp32 for the fine-tuned MiniLM-L6 text encoder at SST-2 lengths, side by side in one process.

    python benchmarks/sst2_int8.py     (needs runs/sst2_bench/minilm_finetuned/bundle: make bench-sst2 first)

Each of the 872 dev sentences (tokenized by the bundle's own preprocessing, so at its real length) runs through
the text encoder's fp32 and int8 graphs at batch 1, alternating, after one warm-up run each; medians per
sentence over the set, at 1 intra-op thread and at onnxruntime's default (one per core). Results:
benchmarks/results/sst2_int8.{json,md}, with the CPU's instruction sets (int8 kernels differ by CPU).
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "runs" / "sst2_bench" / "minilm_finetuned" / "bundle"
MANIFEST = ROOT / "runs" / "sst2_bench" / "data" / "manifest.csv"
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/sst2_int8.py"


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    import polysense
    from polysense.machine import machine

    if not BUNDLE.is_dir():
        raise SystemExit(f"{BUNDLE} is missing: run make bench-sst2 first")
    pipe = polysense.Pipeline.load(BUNDLE, device="cpu", precision="fp32")
    with MANIFEST.open(newline="") as handle:
        texts = [row["text"] for row in csv.DictReader(handle) if row["split"] == "test"]
    ids = [pipe.prepare({"text": t}).features["text"] for t in texts]
    component = pipe.description.component("text_encoder")
    report = {"command": COMMAND, "machine": machine(), "sentences": len(ids)}
    report["tokens_median"] = float(np.median([len(i) for i in ids]))
    for threads in (1, 0):
        graphs = {p: session(BUNDLE / component.variant(p).file, threads) for p in ("fp32", "int8")}
        times: dict[str, list[float]] = {p: [] for p in graphs}
        for row in ids:
            feeds = {"ids": row[None], "mask": np.ones((1, row.size), np.int64)}
            for precision, graph in graphs.items():
                graph.run(None, feeds)
                start = time.perf_counter()
                graph.run(None, feeds)
                times[precision].append((time.perf_counter() - start) * 1000)
        medians = {p: statistics.median(t) for p, t in times.items()}
        report[f"threads_{threads or 'default'}"] = {
            **medians,
            "int8_speedup": medians["fp32"] / medians["int8"],
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sst2_int8.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# MiniLM-L6 text encoder on SST-2 dev: int8 vs fp32",
        "",
        f"Command: `{COMMAND}`. Machine: {report['machine']['cpus']} CPUs, {'/'.join(report['machine']['isa'])}.",
        f"{report['sentences']} dev sentences at batch 1 (median {report['tokens_median']:.0f} tokens), medians per "
        "sentence, fp32 and int8 alternating.",
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
    main()
