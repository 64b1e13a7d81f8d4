"""Image alone on held-out sign-digit photos: the pretrained image encoder against training from scratch.

    python benchmarks/avdigits/image_only.py        (or: make bench-avdigits-image; about 25 minutes on 2 cores)

Trains an image-only model on the AV-digits manifest (`polysense data avdigits`, then `polysense train
--modalities image`) for each configuration, side by side in one run:
  - `efficientnet-lite0`: ImageNet EfficientNet-Lite0, its family defaults (4 epochs, 192 pixels, 3e-4 for the
    pretrained layers, label smoothing 0.1, the final epoch's weights);
  - `efficientnet-lite0-from-scratch`: the same network, resolution, 4 epochs, label smoothing and final epoch
    from random weights (what the transfer itself brings);
  - `cnn`: the default small CNN at the AV-digits benchmark's 15 epochs and 64 pixels.
The manifest pairs each of the 250 test recordings with a held-out photo of its digit, so its test split shows
the 164 held-out photos 1-2 times each. Each model is therefore also exported (fp32) and run through the
runtime once per distinct held-out photo: that accuracy, and which photos it misreads, are the image figures;
the 250-row PyTorch test accuracy is kept beside them. Results: results/image_only.{json,md}.
`--merge` keeps the results already there for the configurations not run again (same seed, same kind of
machine), so one configuration can be added or re-run alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2

import polysense
from polysense.machine import describe, machine, results_from_this_machine
from polysense.tools.manifest import read_manifest

if __package__:  # imported as benchmarks.avdigits.image_only (python -m, the tests)
    from .run import build, export, fit, recorded_commands, summary
else:  # run as a file: its own folder is on the import path
    from run import build, export, fit, recorded_commands, summary

COMMAND = "make bench-avdigits-image"


@dataclass(frozen=True)
class Config:
    name: str
    options: dict = field(default_factory=dict)  # TrainOptions fields besides the data
    epochs: int = 0  # 0: what the family asks for


CONFIGS = (
    Config("efficientnet-lite0", {"image_encoder": "efficientnet-lite0"}),
    Config(
        "efficientnet-lite0-from-scratch",
        {"image_encoder": "efficientnet-lite0", "from_scratch": True, "keep": "last", "label_smoothing": 0.1},
        4,
    ),
    Config("cnn", {"image_encoder": "cnn"}, 15),
)

log = logging.getLogger("polysense")


def held_out_photos(manifest: Path) -> list[tuple[str, str]]:
    """(photo, label) of each distinct photo in the test split, in manifest order."""
    photos: dict[str, str] = {}
    for row in read_manifest(manifest).rows:
        if row.split == "test":
            photos.setdefault(row.image, row.label)
    return list(photos.items())


def photo_accuracy(bundle: Path, photos: list[tuple[str, str]]) -> dict:
    """Accuracy of the fp32 bundle through the runtime, one prediction per photo, and the photos it misreads."""
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    images = [{"image": cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)} for path, _ in photos]
    predicted = [p.label for p in pipeline.predict_batch(images)]
    wrong = [
        {"photo": Path(path).parent.name + "/" + Path(path).name, "label": label, "predicted": guess}
        for (path, label), guess in zip(photos, predicted)
        if guess != label
    ]
    return {"photos": len(photos), "accuracy": 1 - len(wrong) / len(photos), "misread": wrong}


def run(
    work: Path,
    configs: tuple[Config, ...],
    seed: int,
    out: Path,
    previous: dict | None = None,
    command: str = COMMAND,
) -> dict:
    """Train, export and score every configuration; `previous` (results of an earlier run on this kind of
    machine, at the same seed) supplies the configurations not run again. `command` is recorded with them."""
    manifest = build(work)
    photos = held_out_photos(manifest)
    results: dict = {
        "seed": seed,
        "configs": {c.name: {**c.options, "epochs": c.epochs} for c in configs},
        "models": {},
        "machine": machine(),  # training numerics differ between CPU instruction sets
        "command": command,
    }
    if previous is not None:
        if previous["seed"] != seed:
            raise SystemExit(f"--merge: the results in {out} are for seed {previous['seed']}, not {seed}")
        # A merged run is reproduced by the earlier commands, then this one.
        results["commands"] = [*recorded_commands(previous, COMMAND), command]
        results["configs"] = {**previous["configs"], **results["configs"]}
        results["models"] = dict(previous["models"])
    for config in configs:
        log.warning("image only: %s", config.name)
        folder = work / (f"image_{config.name}" + ("" if seed == 0 else f"_seed{seed}"))
        started = time.perf_counter()
        metrics = fit(manifest, folder, config.epochs, ("image",), seed=seed, **config.options)
        seconds = time.perf_counter() - started
        results["models"][config.name] = {
            "held_out_photos": photo_accuracy(export(folder, variants=False), photos),
            "test_rows": summary(metrics),
            "train_seconds": round(seconds, 1),
            "epochs_run": len(metrics.get("history", [])),
        }
        accuracy = results["models"][config.name]["held_out_photos"]["accuracy"]
        log.warning("  %.4f on held-out photos in %.0f s", accuracy, seconds)
        write(results, out)  # after every model, so an interrupted run keeps what it measured
    return results


def markdown(results: dict) -> str:
    machine_info = results.get("machine", {})
    lines = [
        "# AV-digits: image alone on held-out sign-digit photos, pretrained against from scratch",
        "",
        f"Command: {_commands(results)}. Training seed {results['seed']}.",
        "",
        f"Machine: {describe(machine_info)}.",
        "",
        "| image encoder | held-out photos (runtime, fp32) | photos misread | test rows (PyTorch, 250) | epochs | train time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in ordered(results["models"]).items():
        photos, rows = entry["held_out_photos"], entry["test_rows"]
        lines.append(
            f"| {name} | {photos['accuracy']:.4f} | {len(photos['misread'])} of {photos['photos']} "
            f"| {rows['accuracy']:.4f} | {entry['epochs_run']} | {entry['train_seconds'] / 60:.1f} min |"
        )
    lines += ["", "Misread photos (label -> predicted):", ""]
    for name, entry in ordered(results["models"]).items():
        misread = ", ".join(
            f"{m['photo']} ({m['label']} -> {m['predicted']})" for m in entry["held_out_photos"]["misread"]
        )
        lines.append(f"- {name}: {misread or 'none'}")
    return "\n".join(lines) + "\n"


def _commands(results: dict) -> str:
    """The commands that made these results, in order (results before they were recorded: the default one)."""
    named = {COMMAND: f"`{COMMAND}` (`python benchmarks/avdigits/image_only.py`)"}
    return ", then ".join(named.get(c, f"`{c}`") for c in recorded_commands(results, COMMAND))


def ordered(models: dict) -> dict:
    """The models in CONFIGS order, whatever order a run (or a --merge run) added them in."""
    rank = {c.name: index for index, c in enumerate(CONFIGS)}
    return dict(sorted(models.items(), key=lambda item: rank.get(item[0], len(rank))))


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "image_only.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "image_only.md").write_text(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default=str(Path(__file__).resolve().parents[2] / "runs" / "avdigits"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--seed", type=int, default=0, help="training seed of every model")
    parser.add_argument(
        "--configs",
        default=",".join(c.name for c in CONFIGS),
        help="configurations to compare, comma-separated",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the results in --out of the configurations not run again (same seed and kind of machine)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    known = {c.name: c for c in CONFIGS}
    wanted = [name for name in args.configs.split(",") if name]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        parser.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(known)}")
    out = Path(args.out)
    previous = results_from_this_machine(out / "image_only.json") if args.merge else None
    command = (
        " ".join(["python", "benchmarks/avdigits/image_only.py", *sys.argv[1:]]) if sys.argv[1:] else COMMAND
    )
    results = run(Path(args.work), tuple(known[n] for n in wanted), args.seed, out, previous, command)
    print(markdown(results))


if __name__ == "__main__":
    main()
