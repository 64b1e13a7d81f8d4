"""Differential privacy: test accuracy against the epsilon spent, on AV-digits' sign-digit photos.

    python benchmarks/dp.py          (or: make bench-dp; about 30 minutes on 2 shared cores)

The AV-digits manifest (`polysense data avdigits`) pairs each recording with a photo of the same digit, so a
photo can sit in two rows; DP protects rows, and a photo in two training rows would be protected only as a
group of two. The benchmark therefore trains on the photos alone (`--modalities image`), each photo once per
split (the first row that holds it): 1,325 train, 164 val, 164 test. The image `cnn` family, whose BatchNorm
becomes GroupNorm under DP; the same seed, epochs and other options for every point, no early stopping:

  - none: ordinary training (BatchNorm, no clipping, no noise)
  - epsilon 8, 3, 1 (delta 1e-5, rows' gradients clipped to 1.0, PRV accountant)

and the same four with a frozen pretrained encoder, DP's strongest setting: EfficientNet-Lite0's ImageNet
features (the registry package's weights, exported here to ONNX with global average pooling, [N, 1280]) brought
as `--image-encoder onnx:PATH` at 192 pixels, so that only the projection on top and the fusion head train
(privately): few parameters, each row's clipped gradient far above the noise of a small network trained from
random weights.

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
FROZEN_GRAPH = "efficientnet_lite0_features.onnx"  # in --work: the frozen runs' encoder
FROZEN = {"image_encoder": f"onnx:{FROZEN_GRAPH}", "image_size": 192}
RUNS |= {f"frozen_{name}": {**FROZEN, **options} for name, options in RUNS.items()}
# DP-SGD's usual remedy for noise: large batches (the noise is divided by the expected batch), more steps and a
# larger learning rate. Tried once on the epsilon 8 run (its test accuracy seen) and kept for every epsilon.
TUNED = {**FROZEN, "batch_size": 256, "epochs": 30, "lr": 1e-2}
RUNS |= {f"frozen_tuned_epsilon_{e:g}": {**TUNED, "dp_epsilon": e} for e in (8.0, 3.0, 1.0)}


def export_frozen_features(path: Path) -> Path:
    """EfficientNet-Lite0's pretrained features as a user's frozen encoder: ImageNet-normalised pixels (the
    onnx:PATH contract) rescaled to the network's [-1, 1] inside the graph, its last feature map averaged."""
    import torch
    from torch import nn

    from polysense.models.registry import create_encoder
    from polysense.preprocess.image import IMAGENET_MEAN, IMAGENET_STD

    network = create_encoder("image", "efficientnet-lite0").eval()

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            unit = pixels * self.std + self.mean  # back to [0, 1]
            return self.network.features((unit - 0.5) / 0.5).mean(dim=(2, 3))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        Features().eval(),
        (torch.zeros(1, 3, 192, 192),),
        str(path),
        input_names=["pixels"],
        output_names=["features"],
        dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
        dynamo=False,
    )
    return path


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

    recorded = dict(options)
    if "image_encoder" in options:  # the frozen graph, exported once beside the runs
        graph = out.parent / FROZEN_GRAPH
        if not graph.is_file():
            export_frozen_features(graph)
        options = {**options, "image_encoder": f"onnx:{graph}"}
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    result = train(TrainOptions(data=str(manifest), out=str(out), progress=False, **{**COMMON, **options}))
    seconds = time.perf_counter() - started
    metrics = result.metrics
    measured = {
        "options": recorded,
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
        "Command: `make bench-dp` (`python benchmarks/dp.py`). Image `cnn`, or EfficientNet-Lite0's ImageNet "
        "features frozen (onnx:PATH, 192 px: only the projection and fusion train), each photo once per split (1,325 "
        "train / 164 val / 164 test), 5 epochs, no early stopping, seed 0, batch 64 (under DP: the expected "
        "batch of Poisson sampling), otherwise the default options. DP: delta 1e-5, rows' gradients clipped to "
        "1.0, PRV accountant, BatchNorm replaced by GroupNorm.",
        "",
        f"Machine: {info.get('model', '?')}, {info.get('cpus', '?')} CPUs, "
        f"{'/'.join(info.get('isa', [])) or 'instruction sets not recorded'} (2 cores shared with other work: "
        "the times are indicative).",
        "",
        "| image encoder | epsilon asked | epsilon spent | noise multiplier | test accuracy | test macro F1 | train time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in RUNS:
        if name not in results["runs"]:
            continue
        r = results["runs"][name]
        privacy = r.get("privacy")
        asked = f"{privacy['target_epsilon']:g}" if privacy else "none (no DP)"
        spent = f"{privacy['epsilon']:.3f}" if privacy else "-"
        noise = f"{privacy['noise_multiplier']:.3f}" if privacy else "-"
        encoder = "frozen EfficientNet-Lite0 (onnx:PATH)" if name.startswith("frozen_") else "`cnn`"
        if name.startswith("frozen_tuned"):
            encoder += ", batch 256, 30 epochs, lr 0.01"
        lines.append(
            f"| {encoder} | {asked} | {spent} | {noise} | {r['test_accuracy']:.4f} | {r['test_macro_f1']:.4f} "
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
