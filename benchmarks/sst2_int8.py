"""int8 against fp32 for the fine-tuned MiniLM-L6 text encoder at SST-2 lengths, at batch 1.

    python benchmarks/sst2_int8.py     (needs runs/sst2_bench/minilm_finetuned/bundle: make bench-sst2 first)

The 872 dev sentences are tokenized by the bundle's own preprocessing, so each runs at its real length. Each
measurement is a fresh process that opens one graph (fp32 or int8) with the runtime's own session settings
(`polysense.inference.sessions.Session`: no spinning threads, no memory arena), warms up on 20 sentences, then times every
sentence once; it reports the median. A text-only application runs exactly one such session, so nothing else
competes for the cores or caches. fp32 and int8 processes alternate, ROUNDS rounds each (the order flips every
round), at 1 intra-op thread and at onnxruntime's default (one per core); the speed-up is the median over rounds
of fp32 over the median of int8. Results: benchmarks/results/sst2_int8.{json,md}, with the CPU's instruction sets
(int8 kernels differ by CPU); each kind of machine keeps its own section, and a run replaces only its own.

The int8 graph is the one export makes (`quantize_dynamic_int8_of`: for MiniLM, from its export with onnxruntime's
fused attention), made here from the trained run, so the benchmark runs whether or not export kept it. Its accuracy
is measured too, on validation (what export's keep rule reads) and dev, at batch 1 and in batches of 32 padded to
their longest sentence (as `polysense eval` and export run them): dynamic int8 takes one activation scale per
tensor over the whole batch, so its accuracy depends on the batch it runs in.
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
from typing import TYPE_CHECKING

import numpy as np

from polysense.machine import describe, machine, same_kind

if TYPE_CHECKING:
    from polysense.export.components import Component

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "runs" / "sst2_bench" / "minilm_finetuned" / "bundle"
MANIFEST = ROOT / "runs" / "sst2_bench" / "data" / "manifest.csv"
RESULTS = ROOT / "benchmarks" / "results"
COMMAND = "python benchmarks/sst2_int8.py"
ROUNDS = 3
BATCHES = (1, 32)  # accuracy at batch 1 (where the speed is timed) and at evaluation's batch
WARMUP = 20


def measure(graph: Path, ids_file: Path, threads: int) -> float:
    """In this process: median ms per sentence of one graph at batch 1."""
    from polysense.inference.sessions import Session, SessionSettings

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


def split_ids(pipe, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each sentence of a manifest split (the bundle's own preprocessing), and label indices."""
    with MANIFEST.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == split]
    ids = np.empty(len(rows), dtype=object)
    ids[:] = [pipe.prepare({"text": row["text"]}).features["text"] for row in rows]
    return ids, np.array([pipe.labels.index(row["label"]) for row in rows])


def accuracy(encoder, head, ids: np.ndarray, truth: np.ndarray, batch: int) -> float:
    """Accuracy of text encoder session `encoder` under fusion session `head`, `batch` sentences per call, each
    batch padded to its longest sentence by the runtime's own text codec."""
    from polysense.modalities import SPECS

    predicted = []
    for start in range(0, len(ids), batch):
        tokens, mask = SPECS["text"].codec.feeds(list(ids[start : start + batch]))
        embedding = encoder.run({"ids": tokens, "mask": mask})[0]
        present = np.ones((len(tokens), 1), np.float32)
        predicted += list(head.run({"embedding_text": embedding, "mask": present})[0].argmax(1))
    return float(np.mean(np.array(predicted) == truth))


def accuracies(graphs: dict[str, Path], fusion: Path, splits: dict) -> dict:
    """{split: {"batch_N": {precision: accuracy, "int8_points_lost": ...}}}, each text encoder graph under the
    bundle's fp32 fusion; every session is opened once."""
    from polysense.inference.sessions import Session, SessionSettings

    settings = SessionSettings(device="cpu")
    head = Session(fusion, settings)
    encoders = {precision: Session(graph, settings) for precision, graph in graphs.items()}
    found: dict = {}
    for split, (ids, truth) in splits.items():
        for batch in BATCHES:
            entry = {p: accuracy(encoder, head, ids, truth, batch) for p, encoder in encoders.items()}
            entry["int8_points_lost"] = 100 * (entry["fp32"] - entry["int8"])
            found.setdefault(split, {})[f"batch_{batch}"] = entry
    return found


def text_component() -> Component:
    """The trained run's text encoder as export sees it (MiniLM's int8 is made from its own export form)."""
    from polysense.export.components import encoder_component
    from polysense.models.training.run_folder import load_trained

    model, _ = load_trained(BUNDLE.parent)
    component = encoder_component("text", model.encoders["text"], image_size=0)
    component.module.eval()
    return component


def main() -> None:
    import polysense

    if not BUNDLE.is_dir():
        raise SystemExit(f"{BUNDLE} is missing: run make bench-sst2 first")
    from polysense.export.variants import quantize_dynamic_int8_of

    pipe = polysense.Pipeline.load(BUNDLE, device="cpu", precision="fp32")
    description = pipe.description
    fusion = BUNDLE / description.component("fusion").variant("fp32").file
    splits = {"val": split_ids(pipe, "val"), "dev": split_ids(pipe, "test")}
    ids = splits["dev"][0]
    del pipe  # its sessions and their thread pools need not stay alive beside the measuring processes
    report = {"command": COMMAND, "machine": machine(), "sentences": len(ids), "rounds": ROUNDS}
    report["tokens_median"] = float(np.median([len(i) for i in ids]))
    with tempfile.TemporaryDirectory() as folder:
        fp32 = BUNDLE / description.component("text_encoder").variant("fp32").file
        graphs = {"fp32": fp32, "int8": Path(folder) / "text_encoder.int8.onnx"}
        quantize_dynamic_int8_of(text_component(), fp32, graphs["int8"])
        report["accuracy"] = accuracies(graphs, fusion, splits)
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


def measured_machines(path: Path, report: dict) -> list[dict]:
    """The reports in `path` from other kinds of machine, then `report`: int8 kernels, and with them int8's speed
    and even its accuracy, differ by CPU (VNNI, AMX), so each kind keeps its own figures."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    # Results written before they were kept per machine are one report at the top level.
    reports = previous.get("machines", [previous] if "machine" in previous else [])
    return [r for r in reports if not same_kind(r["machine"], report["machine"])] + [report]


def write(report: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    reports = measured_machines(RESULTS / "sst2_int8.json", report)
    (RESULTS / "sst2_int8.json").write_text(
        json.dumps({"command": COMMAND, "machines": reports}, indent=2) + "\n"
    )
    lines = [
        "# MiniLM-L6 text encoder on SST-2 dev: int8 vs fp32",
        "",
        f"Command: `{COMMAND}`. Each kind of machine keeps its own section (int8 kernels differ by CPU); a run "
        "replaces its own machine's.",
    ]
    for entry in reports:
        lines += ["", *machine_section(entry)]
    (RESULTS / "sst2_int8.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def machine_section(report: dict) -> list[str]:
    lines = [
        f"## {describe(report['machine'])}",
        "",
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
    lines += [
        "",
        "Accuracy, text encoder fp32 or int8 with the fp32 fusion (int8 points lost: fp32 minus int8):",
        "",
        "| split | batch | fp32 | int8 | int8 points lost |",
        "|---|---:|---:|---:|---:|",
    ]
    for split, batches in report["accuracy"].items():
        for batch, entry in batches.items():
            lines.append(
                f"| {split} | {batch.removeprefix('batch_')} | {entry['fp32']:.4f} | {entry['int8']:.4f} "
                f"| {entry['int8_points_lost']:.2f} |"
            )
    return lines


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
