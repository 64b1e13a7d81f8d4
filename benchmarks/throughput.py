"""Batch throughput of `polysense predict --data` on real data: SST-2 dev sentences and AV-digits test rows.

    python benchmarks/throughput.py        (or: make bench-throughput; about 3 minutes on 2 cores)

The bundle is the pretrained tri-modal model of `make bench-pytorch-pretrained` (EfficientNet-Lite0, MiniLM-L6,
causal audio; runs/pretrained/bundle, trained one epoch on the built-in data): a speed measurement at real model
scale, where the weights do not matter. It predicts SST-2's 871 dev sentences (text alone) and AV-digits' test
rows (photo + recording), precision `auto`, through polysense.tools.batch_predict.predict_to_file (what
`predict --data` runs), in three rounds, each configuration in turn:
  - grouped: texts run in order of length, 1,024 rows at a time (the default);
  - in order: batches of 32 in the file's order (GROUPED = 32, what predict --data did before), each batch
    padding its texts to its longest.
Writes results/throughput.{json,md}: samples per second (median round) per dataset and configuration.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polysense
from polysense.machine import describe, machine
from polysense.tools import batch_predict

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CONFIGS = {"grouped": batch_predict.GROUPED, "in order": batch_predict.BATCH}


def sst2_dev(folder: Path) -> Path:
    """SST-2's dev sentences as a manifest of texts."""
    manifest = folder / "sst2_dev.csv"
    with (DATA / "sst2" / "dev.tsv").open() as source, manifest.open("w", newline="") as out:
        rows = csv.reader(source, delimiter="\t", quoting=csv.QUOTE_NONE)  # quotes are part of sentences
        next(rows)  # the header: sentence, label
        writer = csv.writer(out)
        writer.writerow(["text"])
        writer.writerows([row[0]] for row in rows)
    return manifest


def avdigits_test(folder: Path) -> Path:
    """AV-digits' test rows (photo + recording) as a manifest without labels."""
    from polysense.datasets.avdigits import AVDigitsSpec, write_avdigits
    from polysense.tools.manifest import read_manifest

    written = write_avdigits(
        AVDigitsSpec(str(DATA / "fsdd"), str(DATA / "sign_digits"), 0), folder / "avdigits"
    )
    manifest = folder / "avdigits_test.csv"
    with manifest.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["image", "audio"])
        writer.writerows([r.image, r.audio] for r in read_manifest(written).rows if r.split == "test")
    return manifest


def measure(pipeline: polysense.Pipeline, manifest: Path, rounds: int, out: Path) -> dict:
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(rounds):
        for name, grouped in CONFIGS.items():
            batch_predict.GROUPED = grouped
            start = time.perf_counter()
            result = batch_predict.predict_to_file(pipeline, manifest, out, progress=False)
            times[name].append(time.perf_counter() - start)
    batch_predict.GROUPED = CONFIGS["grouped"]
    samples = result.written
    rates = {name: samples / statistics.median(seconds) for name, seconds in times.items()}
    return {
        "samples": samples,
        "samples_per_s": rates,
        "grouped_vs_in_order": rates["grouped"] / rates["in order"],
    }


def markdown(results: dict) -> str:
    lines = [
        "# predict --data throughput (samples per second, median of rounds)",
        "",
        f"Command: `{results['command']}`. Machine: {describe(results['machine'])}. Bundle: {results['bundle']}, "
        f"precisions {results['precisions']}.",
        "",
        "| data | samples | grouped by text length | in file order | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, found in results["data"].items():
        rates = found["samples_per_s"]
        lines.append(
            f"| {name} | {found['samples']} | {rates['grouped']:.1f} | {rates['in order']:.1f} | "
            f"{found['grouped_vs_in_order']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "runs" / "pretrained" / "bundle"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if not (DATA / "sst2").is_dir():
        sys.exit(f"{DATA} is missing: the benchmark reads SST-2 and AV-digits from ../shared/data")
    pipeline = polysense.Pipeline.load(args.bundle, device="cpu")
    results: dict = {
        "command": "make bench-throughput",
        "machine": machine(),
        "bundle": "runs/pretrained/bundle" if args.bundle.endswith("runs/pretrained/bundle") else args.bundle,
        "precisions": pipeline.precisions,
        "data": {},
    }
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        for name, manifest in (
            ("SST-2 dev (text)", sst2_dev(folder)),
            ("AV-digits test (image + audio)", avdigits_test(folder)),
        ):
            results["data"][name] = measure(pipeline, manifest, args.rounds, folder / "out.jsonl")
    out = Path(args.out)
    (out / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "throughput.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
