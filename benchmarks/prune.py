"""Structured pruning, pruned against unpruned: size, speed and accuracy at the same precision.

    python benchmarks/prune.py        (or: make bench-prune; about 30 minutes on 2 cores)
    python benchmarks/prune.py --cases sst2 --merge     (one case again, keeping the other's results)

Per case, through the ordinary commands' code:
  1. train the unpruned model (`polysense train`, the options below);
  2. prune it (`polysense prune RUN --out RUN2 --amount A --epochs E`: first-order Taylor importance over 16
     training batches, the same share removed in every layer, then E fine-tuning epochs);
  3. export both (`polysense export`, with --min-speedup 0 so that each bundle keeps its int8 variant whenever
     it is within the accuracy budget, and both precisions can be compared; what the default rule, 1.1x,
     would have kept is reported from the same measurements);
  4. test-split accuracy of each bundle through the runtime, fp32 and int8;
  5. the pruned encoder's graph against the unpruned one at batch 1, one onnxruntime thread, on real test
     inputs (preprocessed by the runtime), all four sessions open and timed in alternating rounds.

Cases: `sst2` (MiniLM-L6, text: trained 1 epoch on all 6,228 training sentences, pruned to half its heads and
feed-forward units, 1 fine-tuning epoch; dev is the test split) and `avdigits` (EfficientNet-Lite0, image
alone on AV-digits: its 4 default epochs, half of every block's expanded channels pruned, 2 fine-tuning
epochs). Results: results/prune/prune.{json,md}, with the machine, the command and the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import polysense
from polysense.bundle.reader import read_description
from polysense.datasets.avdigits import AVDigitsSpec, write_avdigits
from polysense.datasets.sst2 import SST2Spec, write_sst2
from polysense.inference.preprocessors import build_preprocessors
from polysense.inference.sessions import Session, SessionSettings
from polysense.machine import describe, machine, results_from_this_machine
from polysense.modalities import SPECS
from polysense.tools.evaluate import evaluate_bundle
from polysense.tools.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COMMAND = "make bench-prune"
ROUNDS = 5  # alternating timing rounds; the median of the rounds' means counts
SAMPLES = {"text": 64, "image": 16}  # real test inputs timed per round, one at a time
PRECISIONS = ("fp32", "int8")
CASES = {
    "sst2": {
        "title": "SST-2, MiniLM-L6 (text)",
        "modality": "text",
        "train": {"text_encoder": "minilm-l6", "epochs": 1},
        "amount": 0.5,
        "epochs": 1,
    },
    "avdigits": {
        "title": "AV-digits image alone, EfficientNet-Lite0",
        "modality": "image",
        "train": {"image_encoder": "efficientnet-lite0", "modalities": ("image",)},
        "amount": 0.5,
        "epochs": 2,
    },
}

log = logging.getLogger("polysense")


def manifest_for(case: str, work: Path) -> Path:
    if case == "sst2":
        return write_sst2(SST2Spec(str(SHARED / "sst2")), work / "data_sst2")
    spec = AVDigitsSpec(str(SHARED / "fsdd"), str(SHARED / "sign_digits"), 0, None)
    return write_avdigits(spec, work / "data_avdigits")


def train_and_prune(case: dict, manifest: Path, work: Path) -> dict:
    from polysense.models.pruning import PrunePlan
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.prune import prune_run
    from polysense.models.training.train import train

    unpruned, pruned = work / "unpruned", work / "pruned"
    for folder in (unpruned, pruned):
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    trained = train(TrainOptions(data=str(manifest), out=str(unpruned), progress=False, **case["train"]))
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = prune_run(unpruned, pruned, PrunePlan(amount=case["amount"]), case["epochs"], progress=False)
    modality = case["modality"]
    return {
        "train_seconds": round(train_seconds, 1),
        "prune_and_fine_tune_seconds": round(time.perf_counter() - started, 1),
        "pytorch_test_accuracy": {
            "unpruned": trained.metrics["accuracy"],
            "pruned": result.training.metrics["accuracy"],
        },
        "structure": result.report.structures[modality],
        "parameters": {
            "unpruned": result.report.parameters_before[modality],
            "pruned": result.report.parameters_after[modality],
        },
    }


def export_both(work: Path) -> dict[str, Path]:
    from polysense.export import VariantPolicy, export_run

    bundles = {}
    for name in ("unpruned", "pruned"):
        bundle = work / f"{name}_bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        policy = VariantPolicy(precisions=("int8",), min_speedup=0.0)
        bundles[name] = export_run(work / name, bundle, progress=False, policy=policy).bundle
    return bundles


def accuracy(bundles: dict[str, Path], manifest: Path, modality: str) -> dict:
    """Test accuracy through the runtime of each bundle at each precision its encoder has (the fusion head at
    fp32: only the encoder is pruned)."""
    found: dict = {}
    for name, bundle in bundles.items():
        kept = read_description(bundle).components[f"{modality}_encoder"].variants
        for precision in PRECISIONS:
            if precision not in kept:  # int8 lost more than the budget: export dropped it
                continue
            pipeline = polysense.Pipeline.load(
                bundle, device="cpu", precision={f"{modality}_encoder": precision, "fusion": "fp32"}
            )
            metrics = evaluate_bundle(pipeline, manifest, "test", progress=False)
            found.setdefault(name, {})[precision] = metrics["accuracy"]
    return found


def encoder_inputs(bundle: Path, manifest: Path, modality: str) -> list[dict[str, np.ndarray]]:
    """Batch-1 feeds of real test inputs, preprocessed as the runtime does."""
    description = read_description(bundle)
    spec = description.components[f"{modality}_encoder"]
    preprocess = build_preprocessors(description.preprocessing, (modality,), bundle)[modality]
    values = list(
        dict.fromkeys(getattr(r, modality) for r in read_manifest(manifest).rows if r.split == "test")
    )
    names = [t.name for t in spec.inputs]
    return [
        dict(zip(names, SPECS[modality].codec.feeds([preprocess(v)]))) for v in values[: SAMPLES[modality]]
    ]


def latency(bundles: dict[str, Path], feeds: list[dict[str, np.ndarray]], modality: str) -> dict:
    """Milliseconds per sample of each bundle's encoder at each precision, batch 1, one thread: every session
    open at once and timed in alternating rounds, so a change in the machine's load reaches all alike."""
    sessions = {}
    for name, bundle in bundles.items():
        spec = read_description(bundle).components[f"{modality}_encoder"]
        for precision in PRECISIONS:
            if precision in spec.variants:
                path = bundle / spec.variant(precision).file
                sessions[(name, precision)] = Session(path, SessionSettings(device="cpu", intra_op_threads=1))
    rounds: dict = {key: [] for key in sessions}
    for _ in range(ROUNDS):
        for key, session in sessions.items():
            for feed in feeds[:4]:  # warm-up
                session.run(feed)
            started = time.perf_counter()
            for feed in feeds:
                session.run(feed)
            rounds[key].append((time.perf_counter() - started) * 1000 / len(feeds))
    found: dict = {}
    for (name, precision), values in rounds.items():
        found.setdefault(name, {})[precision] = round(statistics.median(values), 3)
    return found


def sizes(bundles: dict[str, Path], modality: str) -> dict:
    found: dict = {}
    for name, bundle in bundles.items():
        spec = read_description(bundle).components[f"{modality}_encoder"]
        found[name] = {p: v.bytes for p, v in spec.variants.items()}
        found[name]["int8_export_measurement"] = [
            {k: m.get(k) for k in ("precision", "kept", "speedup", "accuracy_drop_points", "reason")}
            for m in spec.measurements
        ]
    return found


def verdicts(result: dict) -> dict:
    """Per precision: the pruned encoder's speed-up and test accuracy change against the unpruned one at that
    precision, and whether it pays by the export's rule (at least 1.1x faster, at most 1 point lost) and by the
    issue's target (at least 1.4x faster, within 1 point)."""
    found = {}
    for precision in PRECISIONS:
        ms, acc = result["ms_per_sample"], result["runtime_test_accuracy"]
        if precision not in ms.get("pruned", {}) or precision not in ms.get("unpruned", {}):
            continue
        speedup = ms["unpruned"][precision] / ms["pruned"][precision]
        drop = (acc["unpruned"][precision] - acc["pruned"][precision]) * 100
        found[precision] = {
            "speedup": round(speedup, 2),
            "accuracy_drop_points": round(drop, 2),
            "pays_by_export_rule": speedup >= 1.1 and drop <= 1.0,
            "meets_target": speedup >= 1.4 and drop <= 1.0,
        }
    return found


def run_case(name: str, work: Path) -> dict:
    case = CASES[name]
    case_work = work / name
    manifest = manifest_for(name, work)
    result = {"title": case["title"], "amount": case["amount"], "fine_tuning_epochs": case["epochs"]}
    result.update(train_and_prune(case, manifest, case_work))
    bundles = export_both(case_work)
    result["runtime_test_accuracy"] = accuracy(bundles, manifest, case["modality"])
    result["encoder_bytes"] = sizes(bundles, case["modality"])
    feeds = encoder_inputs(bundles["unpruned"], manifest, case["modality"])
    result["load_average_before_timing"] = os.getloadavg()[0]
    result["ms_per_sample"] = latency(bundles, feeds, case["modality"])
    result["load_average_after_timing"] = os.getloadavg()[0]
    result["timed_samples"] = len(feeds)
    result["verdicts"] = verdicts(result)
    return result


def markdown(results: dict) -> str:
    lines = [
        "# Structured pruning: pruned against unpruned, same precision",
        "",
        f"Command: `{results.get('command', COMMAND)}`. Machine: {describe(results['machine'])}.",
        "",
        "Speed: the encoder graph alone, batch 1, one onnxruntime thread, milliseconds per sample over real test "
        f"inputs ({', '.join(f'{n} {m}' for m, n in SAMPLES.items())} inputs), the four graphs timed in "
        f"{ROUNDS} alternating rounds (median). Accuracy: the test split through the runtime. The machine is "
        "shared: the 1-minute load average is given for each timing.",
    ]
    for result in results["cases"].values():
        params = result["parameters"]
        lines += [
            "",
            f"## {result['title']}",
            "",
            f"Pruned: {result['amount']:.0%} removed per layer, {result['fine_tuning_epochs']} fine-tuning "
            f"epoch(s); keeps {result['structure']}. Encoder parameters {params['unpruned']:,} -> "
            f"{params['pruned']:,} ({params['pruned'] / params['unpruned']:.0%}). Training "
            f"{result['train_seconds'] / 60:.1f} min, pruning and fine-tuning "
            f"{result['prune_and_fine_tune_seconds'] / 60:.1f} min. Load average while timing: "
            f"{result['load_average_before_timing']:.2f} before, {result['load_average_after_timing']:.2f} after.",
            "",
            "| precision | encoder MB unpruned | pruned | ms/sample unpruned | pruned | speed-up | test accuracy "
            "unpruned | pruned | points lost | pays (1.1x, 1 pt) | target (1.4x, 1 pt) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for precision, verdict in result["verdicts"].items():
            size, ms = result["encoder_bytes"], result["ms_per_sample"]
            acc = result["runtime_test_accuracy"]
            lines.append(
                f"| {precision} | {size['unpruned'][precision] / 1e6:.1f} | {size['pruned'][precision] / 1e6:.1f} "
                f"| {ms['unpruned'][precision]:.3f} | {ms['pruned'][precision]:.3f} | {verdict['speedup']:.2f}x "
                f"| {acc['unpruned'][precision]:.4f} | {acc['pruned'][precision]:.4f} "
                f"| {verdict['accuracy_drop_points']:.2f} | {'yes' if verdict['pays_by_export_rule'] else 'no'} "
                f"| {'met' if verdict['meets_target'] else 'not met'} |"
            )
        lines += [
            "",
            "int8 against fp32 within each bundle, as export measured it (batch 1, default threads):",
            "",
        ]
        for name in ("unpruned", "pruned"):
            for m in result["encoder_bytes"][name]["int8_export_measurement"]:
                speed = "not measured" if m["speedup"] is None else f"{m['speedup']:.2f}x"
                rule = "kept" if m["accuracy_drop_points"] <= 1 and (m["speedup"] or 0) >= 1.1 else "rejected"
                lines.append(
                    f"- {name}: int8 {speed} fp32 speed, {m['accuracy_drop_points']:.2f} validation points lost: "
                    f"the default rule (1.1x, 1 point) would have {rule} it"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES), help="which cases, comma-separated")
    parser.add_argument(
        "--work", default=str(ROOT / "runs" / "prune_bench"), help="data and runs (not committed)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prune"))
    parser.add_argument("--merge", action="store_true", help="keep the results in --out of the cases not run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    wanted = [c for c in args.cases.split(",") if c]
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    results = (
        results_from_this_machine(out / "prune.json") if args.merge else {"machine": machine(), "cases": {}}
    )
    results["command"] = " ".join(["python benchmarks/prune.py", *sys.argv[1:]])
    for name in wanted:
        log.warning("case %s", name)
        results["cases"][name] = run_case(name, work)
        (out / "prune.json").write_text(json.dumps(results, indent=2) + "\n")  # first: markdown reads it
        (out / "prune.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
