"""SST-2 benchmark: real sentences labelled by people, three ways to encode them.

    python benchmarks/sst2.py        (or: make bench-sst2; about 40 minutes on 2 cores)
    python benchmarks/sst2.py --runs minilm_finetuned_seed2 --merge     (one run again, keeping the others)

Trains, with the ordinary training code and each family's default flags (`polysense data sst2`, then
`polysense train --data <manifest> --text-encoder ...`):
  - minilm-l6, fine-tuned   (pretrained all-MiniLM-L6-v2; --strategy joint), at training seeds 0, 1 and 2
  - minilm-l6, frozen       (feature extraction; --strategy frozen)
  - gru from scratch        (a BiGRU over a tokenizer learned from the training sentences)
and reports dev accuracy (dev is the test split), macro F1 and training time. The fine-tuned model is also
exported (seed 0) and evaluated through the runtime with precision `auto` and with fp32, and the export's measurement of
the int8 text encoder (batch 1, against its fp32) is quoted. Results: results/sst2.{json,md}; each finished
run is written to the JSON as it completes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import polysense
from polysense.datasets.sst2 import SST2Spec, write_sst2
from polysense.machine import machine, results_from_this_machine
from polysense.tools.evaluate import evaluate_bundle

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "sst2"
RUNS = {
    "minilm_finetuned": {"text_encoder": "minilm-l6"},
    # The same at other training seeds: one run moves by about a point of dev accuracy from seed to seed.
    "minilm_finetuned_seed1": {"text_encoder": "minilm-l6", "seed": 1},
    "minilm_finetuned_seed2": {"text_encoder": "minilm-l6", "seed": 2},
    "minilm_frozen": {"text_encoder": "minilm-l6", "strategy": "frozen"},
    "bigru_scratch": {"text_encoder": "gru"},
}


def train_run(manifest: Path, out: Path, options: dict) -> dict:
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    result = train(TrainOptions(data=str(manifest), out=str(out), progress=False, **options))
    seconds = time.perf_counter() - started
    metrics = result.metrics
    return {
        "options": options,
        "dev_accuracy": metrics["accuracy"],
        "dev_macro_f1": metrics["macro_f1"],
        "train_seconds": round(seconds, 1),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
    }


def through_runtime(run: Path, manifest: Path) -> dict:
    from polysense.export import export_run

    bundle = run / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    export_run(run, bundle, progress=False)
    results = {}
    for precision in ("auto", "fp32"):
        pipeline = polysense.Pipeline.load(bundle, device="cpu", precision=precision)
        metrics = evaluate_bundle(pipeline, manifest, "test", progress=False)
        results[precision] = {
            "dev_accuracy": metrics["accuracy"],
            "dev_macro_f1": metrics["macro_f1"],
            "precisions": pipeline.precisions,
        }
    measured = pipeline.description.components["text_encoder"]  # what export measured, in the bundle
    results["text_encoder_variants"] = [
        {
            k: m.get(k)
            for k in ("precision", "device", "kept", "reason", "speedup", "accuracy_drop_points", "bytes")
        }
        for m in measured.measurements
    ]
    return results


def markdown(results: dict) -> str:
    names = {
        "minilm_finetuned": "MiniLM-L6, fine-tuned",
        "minilm_finetuned_seed1": "MiniLM-L6, fine-tuned, seed 1",
        "minilm_finetuned_seed2": "MiniLM-L6, fine-tuned, seed 2",
        "minilm_frozen": "MiniLM-L6, frozen (feature extraction)",
        "bigru_scratch": "BiGRU from scratch",
    }
    info = results.get("machine", {})
    lines = [
        "# SST-2 (sentence sentiment, labelled by people): dev accuracy",
        "",
        "Command: `make bench-sst2` (`python benchmarks/sst2.py`). Train 6,228 / val 692 (10 % of train) / "
        "dev 872 as the test split; each family's default flags.",
        "",
        f"Machine: {info.get('cpus', '?')} CPUs, {'/'.join(info.get('isa', [])) or 'instruction sets not recorded'}.",
        "",
        "| model | dev accuracy | dev macro F1 | train time | epochs (best) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in names.items():
        if key in results["runs"]:
            r = results["runs"][key]
            lines.append(
                f"| {label} | {r['dev_accuracy']:.4f} | {r['dev_macro_f1']:.4f} | {r['train_seconds'] / 60:.1f} min "
                f"| {r['epochs_run']} ({r['best_epoch']}) |"
            )
    runs = results["runs"]
    seeds = [runs[k]["dev_accuracy"] for k in names if k.startswith("minilm_finetuned") and k in runs]
    if len(seeds) > 1:
        each = ", ".join(f"{a:.4f}" for a in seeds)
        lines += [
            "",
            f"MiniLM-L6 fine-tuned over {len(seeds)} training seeds: mean dev accuracy "
            f"{sum(seeds) / len(seeds):.4f} ({each}).",
        ]
    runtime = results.get("runtime")
    if runtime:
        lines += [
            "",
            f"Fine-tuned MiniLM through the runtime: `auto` ({runtime['auto']['precisions']['text_encoder']} text "
            f"encoder) dev accuracy {runtime['auto']['dev_accuracy']:.4f}, fp32 {runtime['fp32']['dev_accuracy']:.4f}.",
            "",
            "| text encoder variant | device | kept | speed vs fp32 (batch 1) | val points lost | bytes |",
            "|---|---|---|---:|---:|---:|",
        ]
        for v in runtime["text_encoder_variants"]:
            # A CUDA variant's speed at export is measured on the CPU, which says nothing about CUDA.
            speed = f"{v['speedup']:.2f}x" if v.get("speedup") and v["device"] == "cpu" else "not measured"
            lost = f"{v['accuracy_drop_points']:.2f}" if v.get("accuracy_drop_points") is not None else "-"
            lines.append(
                f"| {v['precision']} | {v['device']} | {v['kept']} | {speed} | {lost} | {v['bytes']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sst2", default=str(SHARED), help="folder with train.tsv and dev.tsv")
    parser.add_argument(
        "--work", default=str(ROOT / "runs" / "sst2_bench"), help="data and runs (not committed)"
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
    manifest = write_sst2(SST2Spec(args.sst2), work / "data")
    results: dict = (
        results_from_this_machine(out / "sst2.json") if args.merge else {"machine": machine(), "runs": {}}
    )

    def save() -> None:
        (out / "sst2.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "sst2.md").write_text(markdown(results))

    for name in wanted:
        logging.warning("training %s", name)
        results["runs"][name] = train_run(manifest, work / name, RUNS[name])
        save()
        if name == "minilm_finetuned":
            results["runtime"] = through_runtime(work / name, manifest)
            save()
    print(markdown(results))


if __name__ == "__main__":
    main()
