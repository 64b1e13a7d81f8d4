"""Write the small bundles the torch-free test tier runs on: tests/assets/tiny_bundle and tiny_bundle_other.

    .venv/bin/python tests/assets/make_tiny_bundle.py      (or: make tiny-bundle; needs torch, ~1 minute)

Each is a tri-modal model trained for a few epochs on the generated built-in set (polysense.datasets.builtin,
never files from ../shared) and exported. tiny_bundle is exported as a real export is (int8 and fp16 variants
tried, kept where they pay on this machine); tiny_bundle_other is another seed, fp32 only: a member of an
ensemble that errs differently. recipe.json records the data and the options, and the test suite reads it: its
slow tier trains and exports a run the same way to check export against torch, and its fast tier regenerates
the same data (deterministic for its seed) to feed the bundles. Run this again after a change to the bundle
format or to what export writes; the slow tier's test_tiny_bundles_are_current says when.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
RECIPE_FILE = ASSETS / "recipe.json"

# The built-in set the bundles are trained on and the tests read (360 samples, 30 per label; ~1 s to write).
DATA = {"n": 360, "seed": 3}
# Small on purpose: 8 image channels, 32x32 pixels, 32-number embeddings (the GRUs of the text and audio
# families are most of each bundle).
COMMON = {"image_width": 8, "image_size": 32, "embed_dim": 32, "batch_size": 32, "patience": 0, "lr": 5e-3}
BUNDLES = {
    # name: (training options, variants tried at export: "all" like `polysense export`, or "fp32" alone)
    "tiny_bundle": {"train": {**COMMON, "epochs": 3, "seed": 0}, "variants": "all"},
    "tiny_bundle_other": {"train": {**COMMON, "epochs": 2, "seed": 1}, "variants": "fp32"},
}
LATENCY_RUNS = 20  # timed runs per variant at export (the CLI's default, 200, only makes it slower)


def recipe() -> dict:
    return {"data": DATA, "latency_runs": LATENCY_RUNS, "bundles": BUNDLES}


def export_policy(variants: str, latency_runs: int = LATENCY_RUNS):
    """The export's VariantPolicy for a recipe's `variants` (None: fp32 only)."""
    from polysense.export.variants import VariantPolicy

    return VariantPolicy(latency_runs=latency_runs) if variants == "all" else None


def train_and_export(data: Path, name: str, work: Path, out: Path) -> None:
    from polysense.export import export_run
    from polysense.models.training.options import TrainOptions
    from polysense.models.training.train import train

    entry = BUNDLES[name]
    run = work / f"{name}_run"
    train(TrainOptions(data=str(data), out=str(run), progress=False, **entry["train"]))
    export_run(run, out, progress=False, policy=export_policy(entry["variants"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="folder for the bundles and recipe.json")
    args = parser.parse_args(argv)
    from polysense.datasets.builtin import BuiltinSpec, write_builtin

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_builtin(work / "data", BuiltinSpec(**DATA), progress=False)
        for name in BUNDLES:
            fresh = work / name
            train_and_export(data, name, work, fresh)
            target = args.out / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(fresh, target)
            size = sum(p.stat().st_size for p in target.iterdir())
            print(f"{target}: {len(list(target.iterdir()))} files, {size / 1024:.0f} KB")
    (args.out / RECIPE_FILE.name).write_text(json.dumps(recipe(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
