"""Differential privacy: test accuracy against the epsilon spent, on AV-digits' sign-digit photos.

    python benchmarks/dp.py          (or: make bench-dp; about 30 minutes on 2 shared cores)

The AV-digits manifest (`polysense data avdigits`) pairs each recording with a photo of the same digit, so a
photo can sit in two rows; DP protects rows, and a photo in two training rows would be protected only as a
group of two. The benchmark therefore trains on the photos alone (`--modalities image`), each photo once per
split (the first row that holds it): 1,325 train, 164 val, 164 test. The image `cnn` family, whose BatchNorm
becomes GroupNorm under DP; the same seed, epochs and other options for every point, no early stopping:

  - none: ordinary training (BatchNorm, no clipping, no noise)
  - epsilon 8, 3, 1 (delta 1e-5, rows' gradients clipped to 1.0, PRV accountant)

Results: results/dp.{json,md}, each run written to the JSON as it completes. The epsilon 8 run is also exported
and evaluated through the runtime, and its bundle's privacy record quoted.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import time
from pathlib import Path

import polysense
from polysense.datasets.avdigits import AVDigitsSpec, build_rows
from polysense.machine import machine, results_from_this_machine
from polysense.tools.evaluate import evaluate_bundle

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COMMON = {"modalities": ("image",), "epochs": 5, "patience": 0, "seed": 0}
RUNS = {
    "none": {},
    "epsilon_8": {"dp_epsilon": 8.0},
    "epsilon_3": {"dp_epsilon": 3.0},
    "epsilon_1": {"dp_epsilon": 1.0},
}


def photo_manifest(fsdd: str, images: str, out: Path) -> Path:
    """AV-digits' rows reduced to their photos, each photo once per split."""
    out.mkdir(parents=True, exist_ok=True)
    seen, rows = set(), []
    for row in build_rows(AVDigitsSpec(fsdd, images)):
        key = (row["split"], row["image"])
        if key not in seen:
            seen.add(key)
            rows.append(
                {"image": os.path.relpath(row["image"], out), "label": row["label"], "split": row["split"]}
            )
    path = out / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def train_run(manifest: Path, out: Path, options: dict) -> dict:
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    result = train(TrainOptions(data=str(manifest), out=str(out), progress=False, **COMMON, **options))
    seconds = time.perf_counter() - started
    metrics = result.metrics
    measured = {
        "options": {**options},
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "train_seconds": round(seconds, 1),
        "best_epoch": result.best_epoch,
        "epsilon_by_epoch": [h.get("epsilon") for h in metrics["history"]],
    }
    if "privacy" in metrics:
        measured["privacy"] = metrics["privacy"]
    return measured


def through_runtime(run: Path, manifest: Path) -> dict:
    from polysense.export import export_run

    bundle = run / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    export_run(run, bundle, progress=False)
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    metrics = evaluate_bundle(pipeline, manifest, "test", progress=False)
    privacy = pipeline.description.privacy
    return {
        "test_accuracy_fp32": metrics["accuracy"],
        "bundle_privacy": privacy.to_dict() if privacy is not None else None,
    }


def markdown(results: dict) -> str:
    info = results.get("machine", {})
    lines = [
        "# Differential privacy: test accuracy against epsilon (AV-digits' sign-digit photos)",
        "",
        "Command: `make bench-dp` (`python benchmarks/dp.py`). Image `cnn`, each photo once per split (1,325 "
        "train / 164 val / 164 test), 5 epochs, no early stopping, seed 0, batch 64 (under DP: the expected "
        "batch of Poisson sampling), otherwise the default options. DP: delta 1e-5, rows' gradients clipped to "
        "1.0, PRV accountant, BatchNorm replaced by GroupNorm.",
        "",
        f"Machine: {info.get('model', '?')}, {info.get('cpus', '?')} CPUs, "
        f"{'/'.join(info.get('isa', [])) or 'instruction sets not recorded'} (2 cores shared with other work: "
        "the times are indicative).",
        "",
        "| epsilon asked | epsilon spent | noise multiplier | test accuracy | test macro F1 | train time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in RUNS:
        if name not in results["runs"]:
            continue
        r = results["runs"][name]
        privacy = r.get("privacy")
        asked = f"{privacy['target_epsilon']:g}" if privacy else "none (no DP)"
        spent = f"{privacy['epsilon']:.3f}" if privacy else "-"
        noise = f"{privacy['noise_multiplier']:.3f}" if privacy else "-"
        lines.append(
            f"| {asked} | {spent} | {noise} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} "
            f"| {r['train_seconds'] / 60:.1f} min |"
        )
    runtime = results.get("runtime")
    if runtime:
        lines += [
            "",
            f"The epsilon 8 model through the runtime (fp32): test accuracy {runtime['test_accuracy_fp32']:.4f}; "
            f"its bundle records `privacy`: `{json.dumps(runtime['bundle_privacy'])}`.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fsdd", default=str(SHARED / "fsdd"))
    parser.add_argument("--images", default=str(SHARED / "sign_digits"))
    parser.add_argument(
        "--work", default=str(ROOT / "runs" / "dp_bench"), help="data and runs (not committed)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    parser.add_argument(
        "--merge", action="store_true", help="keep the results in --out of the runs not run again"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work, out = Path(args.work), Path(args.out)
    wanted = [n for n in args.runs.split(",") if n]
    unknown = [n for n in wanted if n not in RUNS]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join(RUNS)}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = photo_manifest(args.fsdd, args.images, work / "data")
    results: dict = (
        results_from_this_machine(out / "dp.json") if args.merge else {"machine": machine(), "runs": {}}
    )

    def save() -> None:
        (out / "dp.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "dp.md").write_text(markdown(results))

    for name in wanted:
        logging.warning("training %s", name)
        results["runs"][name] = train_run(manifest, work / name, RUNS[name])
        save()
        if name == "epsilon_8":
            results["runtime"] = through_runtime(work / name, manifest)
            save()
    print(markdown(results))


if __name__ == "__main__":
    main()
