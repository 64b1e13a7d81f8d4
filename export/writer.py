"""`polysense export RUN_DIR --out BUNDLE`: every component to ONNX, verified, written as one bundle.

The bundle is assembled in a hidden temporary folder beside BUNDLE and renamed into place only when every
check passed, so a failed or interrupted export leaves no folder that looks like a bundle.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

import polysense
from polysense.audio import AudioPreprocessor
from polysense.bundle import FUSION, MANIFEST_FILE, SCHEMA_VERSION, sha256_file
from polysense.data import read_manifest
from polysense.errors import ConfigError
from polysense.export.components import OPSET, Component, components
from polysense.export.parity import TOLERANCE, ExportError, check_component, export_component
from polysense.export.variants import (
    CALIBRATION_SAMPLES,
    VariantPolicy,
    VariantReport,
    convert_fp16,
    file_entry,
    measure_latency,
    quantize_int8_dynamic,
    quantize_int8_static,
)
from polysense.image import ImagePreprocessor
from polysense.modalities import nonempty_subsets
from polysense.models.model import MultimodalClassifier
from polysense.models.train import load_trained
from polysense.text import TextPreprocessor, pad_token_ids

log = logging.getLogger("polysense")

REAL_SAMPLES = 4  # test-split samples used for parity on real inputs
DEFAULT_POLICY = VariantPolicy()


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
            f"  {name:<14} {v['precision']:<5} {v['speedup']:.2f}x fp32 speed, "
            f"{v['accuracy_drop_points']:.2f} accuracy points lost: {v['reason']}"
            for name, variants in self.variants.items()
            for v in variants
        )


def describe_io(model: onnx.ModelProto) -> dict:
    """Names, dtypes and shapes (symbolic names for dynamic axes) of a graph's inputs and outputs."""

    def describe(values) -> list[dict]:
        described = []
        for value in values:
            tensor = value.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            described.append({"name": value.name, "dtype": dtype, "shape": shape})
        return described

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _real_cases(run_dir: Path, config: dict, model: MultimodalClassifier) -> tuple[dict[str, list], dict]:
    """Inputs per component built from real test-split samples, and the raw samples for the end-to-end check.

    Each encoder gets up to REAL_SAMPLES test rows that have its modality; the fusion head gets their
    embeddings (zeros for a modality no test row has) under every subset mask.
    """
    test_rows = [r for r in read_manifest(run_dir / "manifest.csv").rows if r.split == "test"]
    modalities = model.config.modalities
    pre = config["preprocessing"]
    having = {
        m: [getattr(r, m) for r in test_rows if getattr(r, m) is not None][:REAL_SAMPLES] for m in modalities
    }
    cases: dict[str, list] = {}
    embeddings: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if having.get("image"):
            image = ImagePreprocessor(
                pre["image"]["size"], tuple(pre["image"]["mean"]), tuple(pre["image"]["std"])
            )
            batch = torch.from_numpy(np.stack([image(path) for path in having["image"]]))
            cases["image_encoder"] = [(batch,)]
            embeddings["image"] = model.encoders["image"](batch)
        if having.get("text"):
            text = TextPreprocessor(run_dir / pre["text"]["tokenizer"], pre["text"]["max_length"])
            ids, mask = (torch.from_numpy(a) for a in pad_token_ids(text.encode_many(having["text"])))
            cases["text_encoder"] = [(ids, mask)]
            embeddings["text"] = model.encoders["text"](ids, mask)
        if having.get("audio"):
            audio = AudioPreprocessor(**pre["audio"])
            encoder = model.encoders["audio"]
            clips = [torch.from_numpy(audio(path)).unsqueeze(0) for path in having["audio"]]
            cases["audio_encoder"] = [(clip, *encoder.initial_state(1)) for clip in clips]
            embeddings["audio"] = torch.cat([encoder(clip)[0] for clip in clips])
    count = min((len(e) for e in embeddings.values()), default=0)
    if count:
        stacked = [
            embeddings[m][:count] if m in embeddings else torch.zeros(count, model.config.embed_dim)
            for m in modalities
        ]
        cases[FUSION] = [
            (*stacked, torch.tensor([[float(m in subset) for m in modalities]] * count))
            for subset in nonempty_subsets(modalities)
        ]
    rows = test_rows[:REAL_SAMPLES]
    samples = [{m: getattr(r, m) for m in modalities if getattr(r, m) is not None} for r in rows]
    return cases, {"samples": samples, "labels": [r.label for r in rows]}


def _headline(metrics: dict) -> dict:
    """Test metrics of the training run, overall and per modality subset (no confusion matrices)."""
    keys = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "count")
    headline = {k: metrics[k] for k in keys if k in metrics}
    headline["subsets"] = {
        name: {k: values[k] for k in keys if k in values}
        for name, values in metrics.get("subsets", {}).items()
    }
    return headline


def _producer() -> dict:
    versions = {"polysense": polysense.__version__, "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        versions["onnxruntime"] = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        versions["onnxruntime"] = importlib.metadata.version("onnxruntime-gpu")
    return {**versions, "opset": OPSET, "exporter": "torch.onnx TorchScript (dynamo=False)"}


def _component_entry(component: Component, path: Path, metadata: dict) -> dict:
    """Embed the component's metadata in the ONNX file, then describe the file for the manifest."""
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"polysense": json.dumps({**metadata, "component": component.name})})
    onnx.save(model, str(path))
    return {
        "modality": component.modality,
        **describe_io(model),
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in component.dynamic_axes.items()},
        "precisions": {
            "fp32": {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        },
    }


def _streaming(model: MultimodalClassifier, preprocessing: dict) -> dict:
    if "audio" not in model.config.modalities:
        return {}
    audio = preprocessing["audio"]
    shapes = model.encoders["audio"].state_shapes(batch_size=1)
    return {
        "audio": {
            "sample_rate": audio["sample_rate"],
            "hop_length": audio["hop_length"],
            "n_fft": audio["n_fft"],
            "frames_per_second": audio["sample_rate"] / audio["hop_length"],
            # The encoder is causal with no look-ahead: any number of new frames (>= 1) makes a step.
            "min_frames_per_step": 1,
            "lookahead_frames": 0,
            # State tensors, batch axis as 1 (axis 1 for gru_hidden, 0 otherwise); zeros start a recording.
            "state": {name: list(shape) for name, shape in shapes.items()},
        }
    }


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
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        report = _write_bundle(run_dir, work, model, config, metrics, progress, policy)
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report.bundle = out
    return report


def _write_bundle(
    run_dir: Path,
    work: Path,
    model: MultimodalClassifier,
    config: dict,
    metrics: dict,
    progress: bool,
    policy: VariantPolicy | None,
) -> ExportReport:
    preprocessing = json.loads(json.dumps(config["preprocessing"]))  # a copy to add hashes to
    image_size = preprocessing.get("image", {}).get("size", 0)
    parts = components(model, image_size)
    real_cases, real = _real_cases(run_dir, config, model)
    metadata = {
        "labels": config["labels"],
        "modalities": list(model.config.modalities),
        "embed_dim": model.config.embed_dim,
    }
    entries, parity = {}, {}
    for component in tqdm(parts, desc="exporting", unit="graph", disable=not progress, leave=False):
        path = work / f"{component.name}.fp32.onnx"
        export_component(component, path)
        parity[component.name] = check_component(component, path, real_cases.get(component.name, []))
        entries[component.name] = _component_entry(component, path, metadata)
        log.info(
            "%s: exported, onnx.checker passed, max |torch - onnxruntime| = %.1e",
            component.name,
            parity[component.name],
        )
    if "text" in preprocessing:
        shutil.copyfile(run_dir / preprocessing["text"]["tokenizer"], work / "tokenizer.json")
        preprocessing["text"].update(tokenizer="tokenizer.json", sha256=sha256_file(work / "tokenizer.json"))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **metadata,
        "components": entries,
        "preprocessing": preprocessing,
        "streaming": _streaming(model, preprocessing),
        "metrics": {"fp32": _headline(metrics), "parity_max_abs_diff": parity},
        "producer": _producer(),
    }
    _write_manifest(work, manifest)
    end_to_end = _check_end_to_end(work, model, real)
    if policy is not None and policy.precisions:
        latency_feeds = {name: _first_row(cases[0]) for name, cases in real_cases.items() if cases}
        _add_variants(work, manifest, run_dir, parts, latency_feeds, policy, progress)
    sizes = {p.name: p.stat().st_size for p in sorted(work.iterdir())}
    return ExportReport(
        work,
        parity,
        end_to_end,
        sizes,
        variants={name: entry.get("variants", []) for name, entry in manifest["components"].items()},
    )


def _write_manifest(work: Path, manifest: dict) -> None:
    (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def _first_row(case: tuple[torch.Tensor, ...]) -> tuple[np.ndarray, ...]:
    """Batch-1 numpy inputs from a batch of real inputs (audio cases are batch 1 already)."""
    return tuple(tensor.numpy()[:1] for tensor in case)


def _calibration_images(run_dir: Path, preprocessing: dict) -> list[np.ndarray]:
    """Real training images for static int8 calibration, preprocessed by the runtime."""
    image = preprocessing["image"]
    pre = ImagePreprocessor(image["size"], tuple(image["mean"]), tuple(image["std"]))
    rows = [r for r in read_manifest(run_dir / "manifest.csv").rows if r.split == "train" and r.image]
    step = max(1, len(rows) // CALIBRATION_SAMPLES)
    return [pre(r.image) for r in rows[::step][:CALIBRATION_SAMPLES]]


def _validation_accuracy(work: Path, run_dir: Path, precisions: dict[str, str]) -> dict:
    from polysense.evaluate import evaluate_bundle

    pipeline = polysense.Pipeline.load(work, device="cpu", precision=precisions)
    return evaluate_bundle(pipeline, run_dir / "manifest.csv", "val", progress=False)


def _add_variants(
    work: Path,
    manifest: dict,
    run_dir: Path,
    parts: list[Component],
    latency_feeds: dict[str, tuple[np.ndarray, ...]],
    policy: VariantPolicy,
    progress: bool,
) -> None:
    """Try each variant of each component, keep those that pay, record every measurement in the manifest."""
    baseline = _validation_accuracy(work, run_dir, {})
    base_accuracy = baseline["accuracy"]
    steps = tqdm(parts, desc="precision variants", unit="graph", disable=not progress, leave=False)
    for component in steps:
        entry = manifest["components"][component.name]
        fp32_path = work / entry["precisions"]["fp32"]["file"]
        feeds = dict(zip(component.inputs, latency_feeds[component.name]))
        fp32_ms = measure_latency(fp32_path, feeds, policy.latency_runs)
        entry["precisions"]["fp32"].update(device="any", latency_ms=fp32_ms)
        reports = []
        for precision, method, device, path in _candidates(component, fp32_path, run_dir, manifest, policy):
            entry["precisions"][precision] = file_entry(path, device)
            _write_manifest(work, manifest)
            metrics = _validation_accuracy(work, run_dir, {component.name: precision})
            latency = measure_latency(path, feeds, policy.latency_runs)
            drop = (base_accuracy - metrics["accuracy"]) * 100
            speedup = fp32_ms / latency
            kept, reason = _decide(device, drop, speedup, policy)
            reports.append(
                VariantReport(
                    precision,
                    method,
                    device,
                    kept,
                    reason,
                    path.name if kept else None,
                    path.stat().st_size,
                    metrics["accuracy"],
                    base_accuracy,
                    drop,
                    {k: v["accuracy"] for k, v in metrics["subsets"].items()},
                    latency,
                    fp32_ms,
                    speedup,
                )
            )
            if kept:
                entry["precisions"][precision]["latency_ms"] = latency
            else:
                del entry["precisions"][precision]
                path.unlink()
            log.info(
                "%s %s (%s): accuracy drop %.2f points, %.2fx fp32 speed: %s",
                component.name,
                precision,
                method,
                drop,
                speedup,
                reason,
            )
        entry["variants"] = [r.to_dict() for r in reports]
        _write_manifest(work, manifest)


def _candidates(component: Component, fp32_path: Path, run_dir: Path, manifest: dict, policy: VariantPolicy):
    """(precision, method, device, path) of each variant to try for one component."""
    if "int8" in policy.precisions:
        path = fp32_path.with_name(f"{component.name}.int8.onnx")
        if component.name == "image_encoder":
            samples = _calibration_images(run_dir, manifest["preprocessing"])
            quantize_int8_static(fp32_path, path, "image", samples)
            yield "int8", f"static QDQ, per-channel weights, {len(samples)} training images", "cpu", path
        elif quantize_int8_dynamic(fp32_path, path):
            yield "int8", "dynamic, MatMul/Gemm only", "cpu", path
        else:
            path.unlink(missing_ok=True)
    if "fp16" in policy.precisions:
        path = fp32_path.with_name(f"{component.name}.fp16.onnx")
        convert_fp16(fp32_path, path)
        yield "fp16", "fp16 weights and activations, fp32 inputs/outputs", "cuda", path


def _decide(device: str, drop: float, speedup: float, policy: VariantPolicy) -> tuple[bool, str]:
    if drop > policy.max_accuracy_drop:
        return (
            False,
            f"rejected: loses {drop:.2f} points of validation accuracy (> {policy.max_accuracy_drop})",
        )
    if device == "cpu" and speedup < policy.min_speedup:
        return False, f"rejected: {speedup:.2f}x fp32 speed on CPU (< {policy.min_speedup}x)"
    if device == "cuda":
        return True, "kept for CUDA: accuracy within budget (CUDA latency not measured at export)"
    return True, "kept: accuracy within budget and faster than fp32"


def _check_end_to_end(bundle: Path, model: MultimodalClassifier, real: dict) -> float:
    """Load the bundle with the real runtime and compare its probabilities with torch's on real samples."""
    pipeline = polysense.Pipeline.load(bundle, device="cpu")
    predictions = pipeline.predict_batch(real["samples"])
    worst = 0.0
    with torch.no_grad():
        for sample, prediction in zip(real["samples"], predictions):
            expected = torch.softmax(_torch_logits(model, sample, pipeline), dim=1)[0].numpy()
            got = np.array([prediction.probabilities[label] for label in pipeline.labels])
            worst = max(worst, float(np.abs(expected - got).max()))
    if worst > TOLERANCE:
        raise ExportError(
            f"the runtime's probabilities differ from torch's by {worst:.2e} (> {TOLERANCE:.0e})"
        )
    return worst


def _torch_logits(model: MultimodalClassifier, sample: dict, pipeline) -> torch.Tensor:
    """Torch logits for one raw sample, preprocessed by the runtime's own preprocessors."""
    embeddings, mask = [], []
    for modality in model.config.modalities:
        if modality not in sample:
            embeddings.append(torch.zeros(1, model.config.embed_dim))
            mask.append(0.0)
            continue
        features = pipeline.preprocess(modality, sample[modality])
        encoder = model.encoders[modality]
        if modality == "image":
            embeddings.append(encoder(torch.from_numpy(features)[None]))
        elif modality == "text":
            ids = torch.from_numpy(features)[None]
            embeddings.append(encoder(ids, torch.ones_like(ids)))
        else:
            embeddings.append(encoder(torch.from_numpy(features)[None])[0])
        mask.append(1.0)
    return model.fusion(torch.stack(embeddings, dim=1), torch.tensor([mask]))
