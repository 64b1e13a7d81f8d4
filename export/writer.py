"""`polysense export RUN_DIR --out BUNDLE`: every component to ONNX, verified, written as one bundle.

The bundle is assembled in a hidden temporary folder beside BUNDLE and renamed into place only when every
check passed, so a failed or interrupted export leaves no folder that looks like a bundle. What goes into the
description is built in description.py, the real-sample checks are in checks.py, the variants in variants.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import polysense
from polysense.bundle.reader import read_description, sha256_file
from polysense.bundle.settings import Preprocessing
from polysense.errors import BundleError, ConfigError
from polysense.export.checks import check_end_to_end, real_samples
from polysense.export.components import Component, components
from polysense.export.description import (
    build_description,
    component_spec,
    headline,
    training_privacy,
    write_description,
)
from polysense.export.parity import check_component, export_component
from polysense.export.variants import CALIBRATION_SAMPLES, VariantPolicy, VariantTrial, add_variants
from polysense.inference.preprocessors import build_preprocessors
from polysense.modalities import SPECS, Preprocess
from polysense.models.model import MultimodalClassifier
from polysense.models.training.run_folder import load_trained
from polysense.tools.manifest import read_manifest
from polysense.tools.tune import write_probe

log = logging.getLogger("polysense")

DEFAULT_POLICY = VariantPolicy()
RUN_MANIFEST = "manifest.csv"  # the data manifest a training run writes (split filled)


@dataclass
class ExportReport:
    bundle: Path
    parity: dict[str, float]  # component -> worst |torch - onnxruntime| over all checks
    end_to_end: float  # worst |probability difference| between torch and the runtime on real samples
    sizes: dict[str, int] = field(default_factory=dict)  # file -> bytes
    variants: dict[str, list] = field(default_factory=dict)  # component -> every variant measured

    def variants_table(self) -> str:
        """One line per variant tried: speed, accuracy change and the verdict."""
        return "\n".join(
            f"  {name:<14} {v['precision']:<5} {_speed(v)}, "
            f"{v['accuracy_drop_points']:.2f} accuracy points lost: {v['reason']}"
            for name, variants in self.variants.items()
            for v in variants
        )


def _speed(measurement: dict) -> str:
    speedup = measurement.get("speedup")
    return "speed not measured" if speedup is None else f"{speedup:.2f}x fp32 speed"


def export_run(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    progress: bool = True,
    policy: VariantPolicy | None = DEFAULT_POLICY,
) -> ExportReport:
    """Export the finished run in `run_dir` to the bundle folder `out` (which must not exist yet).

    With a `policy` (the default), int8 and fp16 variants are tried and kept where they pay (variants.py);
    policy=None exports fp32 only.
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out or remove it")
    model, config = load_trained(run_dir)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        report = _write_bundle(run_dir, work, model, config, progress, policy)
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report.bundle = out
    return report


def _export_graphs(
    parts: list[Component], work: Path, cases: dict[str, list], metadata: dict, progress: bool
) -> tuple[dict, dict[str, float]]:
    """Each component to ONNX, checked against torch; its ComponentSpec and its worst difference."""
    specs, parity = {}, {}
    for component in tqdm(parts, desc="exporting", unit="graph", disable=not progress, leave=False):
        path = work / f"{component.name}.fp32.onnx"
        export_component(component, path)
        parity[component.name] = check_component(component, path, cases.get(component.name, []))
        specs[component.name] = component_spec(component, path, metadata)
        log.info(
            "%s: exported, onnx.checker passed, max |torch - onnxruntime| = %.1e",
            component.name,
            parity[component.name],
        )
    return specs, parity


def _bundle_preprocessing(run_dir: Path, work: Path, settings: Preprocessing) -> Preprocessing:
    """The run's preprocessing settings, with the files they name copied into the bundle: the tokenizer
    (hashed here) and the graphs of frozen front ends (byte for byte, refused unless they still have the
    sha256 the run recorded when it copied them from their source)."""
    for modality in (settings.image, settings.text, settings.audio):
        for graph in () if modality is None else modality.graphs:
            shutil.copyfile(run_dir / graph.file, work / graph.file)
            if sha256_file(work / graph.file) != graph.sha256:
                raise BundleError(
                    f"{run_dir / graph.file} is not the graph the run was trained with (its sha256 differs "
                    f"from the one recorded when it was copied from {graph.source}); train the run again"
                )
    if settings.text is None:
        return settings
    shutil.copyfile(run_dir / settings.text.tokenizer, work / "tokenizer.json")
    text = replace(settings.text, tokenizer="tokenizer.json", sha256=sha256_file(work / "tokenizer.json"))
    return replace(settings, text=text)


def _with_default_voice(
    preprocessors: dict[str, Preprocess], settings: Preprocessing
) -> dict[str, Preprocess]:
    """A model trained with --voice-norm takes frames with a voice removed: the checks feed it what the runtime
    gives a recording without a profile (the training speakers' average voice removed)."""
    voice = settings.audio.voice if settings.audio is not None else None
    if voice is None or "audio" not in preprocessors:
        return preprocessors
    raw = preprocessors["audio"]
    return {**preprocessors, "audio": lambda value, rate=None: voice.normalise(raw(value, rate))}


def _write_bundle(
    run_dir: Path,
    work: Path,
    model: MultimodalClassifier,
    config: dict,
    progress: bool,
    policy: VariantPolicy | None,
) -> ExportReport:
    settings = Preprocessing.from_dict(config["preprocessing"])
    modalities = model.config.modalities
    preprocessors = _with_default_voice(build_preprocessors(settings, modalities, run_dir), settings)
    parts = components(model, settings.image.size if settings.image else 0)
    rows = read_manifest(run_dir / RUN_MANIFEST).rows
    real = real_samples([r for r in rows if r.split == "test"], model, parts, preprocessors)
    metadata = {
        "labels": config["labels"],
        "modalities": list(modalities),
        "embed_dim": model.config.embed_dim,
    }
    specs, parity = _export_graphs(parts, work, real.cases, metadata, progress)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    description = build_description(
        model,
        config["labels"],
        parts,
        specs,
        _bundle_preprocessing(run_dir, work, settings),
        {"fp32": headline(metrics), "parity_max_abs_diff": parity},
        training_privacy(metrics),
    )
    write_description(work, description)
    end_to_end = check_end_to_end(work, model, real.samples, preprocessors)
    if policy is not None and policy.precisions:
        latency_feeds = {name: _first_row(cases[0]) for name, cases in real.cases.items() if cases}
        description = add_variants(
            description, parts, latency_feeds, policy, _trial(work, run_dir, rows, preprocessors), progress
        )
    _write_probe(work, rows, modalities)
    sizes = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
    variants = {name: list(c.measurements) for name, c in description.components.items()}
    return ExportReport(work, parity, end_to_end, sizes, variants)


def _write_probe(work: Path, rows: list, modalities: tuple[str, ...]) -> None:
    """probe.npz for `polysense tune`: validation samples as the runtime preprocesses them, fp32's labels."""
    samples = [
        {m: getattr(r, m) for m in modalities if getattr(r, m) is not None} for r in rows if r.split == "val"
    ]
    write_probe(
        polysense.Pipeline.load(work, device="cpu", precision="fp32"), [s for s in samples if s], work
    )


def _first_row(case: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    """Batch-1 numpy inputs from a batch of real inputs (streaming cases are batch 1 already)."""
    return tuple(tensor.numpy()[:1] for tensor in case)


def _trial(work: Path, run_dir: Path, rows: list, preprocessors: dict) -> VariantTrial:
    """Variants are judged on the validation split, through the real runtime."""

    def validate(precisions: dict[str, str]) -> dict:
        from polysense.tools.evaluate import evaluate_bundle

        # Every other component at fp32, so each variant is judged alone against the fp32 baseline.
        fp32 = {name: "fp32" for name in read_description(work).components}
        pipeline = polysense.Pipeline.load(work, device="cpu", precision={**fp32, **precisions})
        return evaluate_bundle(pipeline, run_dir / RUN_MANIFEST, "val", progress=False)

    def calibration(component: Component) -> list[dict[str, np.ndarray]]:
        """Feeds of real training samples for static int8 calibration, preprocessed by the runtime."""
        values = [getattr(r, component.modality) for r in rows if r.split == "train"]
        values = [v for v in values if v is not None]
        step = max(1, len(values) // CALIBRATION_SAMPLES)
        zero_state = [np.zeros(t.shape, np.float32) for t in component.state]
        feeds = []
        for value in values[::step][:CALIBRATION_SAMPLES]:
            inputs = SPECS[component.modality].codec.feeds([preprocessors[component.modality](value)])
            feeds.append(dict(zip(component.inputs, [*inputs, *zero_state])))
        return feeds

    return VariantTrial(work, lambda d: write_description(work, d), validate, calibration)
