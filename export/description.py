"""The bundle description export writes: each component's graph I/O and files, preprocessing, streaming state."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import onnx
import torch

import polysense
from polysense.bundle.reader import sha256_file
from polysense.bundle.schema import (
    DESCRIPTION_FILE,
    AudioStreaming,
    BundleDescription,
    ComponentSpec,
    TensorSpec,
    TrainingPrivacy,
    Variant,
)
from polysense.bundle.settings import Preprocessing
from polysense.export.components import OPSET, Component
from polysense.models.model import MultimodalClassifier


def describe_io(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Names, dtypes and shapes (symbolic names for dynamic axes) of a graph's inputs and outputs."""

    def describe(values) -> tuple[TensorSpec, ...]:
        described = []
        for value in values:
            tensor = value.type.tensor_type
            shape = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            described.append(TensorSpec(value.name, dtype, shape))
        return tuple(described)

    return describe(model.graph.input), describe(model.graph.output)


def component_spec(component: Component, path: Path, metadata: dict) -> ComponentSpec:
    """Embed the component's metadata in its ONNX file, then describe the file."""
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"polysense": json.dumps({**metadata, "component": component.name})})
    onnx.save(model, str(path))
    inputs, outputs = describe_io(model)
    fp32 = Variant("fp32", path.name, sha256_file(path), path.stat().st_size)
    return ComponentSpec(
        component.name, component.modality, inputs, outputs, component.dynamic_axes, {"fp32": fp32}
    )


def streaming(parts: list[Component], preprocessing: Preprocessing) -> AudioStreaming | None:
    """The streaming geometry, when a component carries state (the causal audio encoder)."""
    stateful = [p for p in parts if p.state]
    if not stateful:
        return None
    audio = preprocessing.of(stateful[0].modality)
    return AudioStreaming(stateful[0].state, audio.sample_rate / audio.hop_length)


def headline(metrics: dict) -> dict:
    """Test metrics of the training run, overall and per modality subset (no confusion matrices)."""
    keys = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "count")
    result = {k: metrics[k] for k in keys if k in metrics}
    result["subsets"] = {
        name: {k: values[k] for k in keys if k in values}
        for name, values in metrics.get("subsets", {}).items()
    }
    return result


def training_privacy(metrics: dict) -> TrainingPrivacy | None:
    """What a run trained under --dp-epsilon recorded in metrics.json's `privacy` (None for other runs)."""
    spent = metrics.get("privacy")
    return None if spent is None else TrainingPrivacy.from_dict(spent, "metrics.json privacy")


def producer() -> dict:
    versions = {"polysense": polysense.__version__, "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        versions["onnxruntime"] = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        versions["onnxruntime"] = importlib.metadata.version("onnxruntime-gpu")
    return {**versions, "opset": OPSET, "exporter": "torch.onnx TorchScript (dynamo=False)"}


def build_description(
    model: MultimodalClassifier,
    labels: list[str],
    parts: list[Component],
    specs: dict[str, ComponentSpec],
    preprocessing: Preprocessing,
    metrics: dict,
    privacy: TrainingPrivacy | None = None,
) -> BundleDescription:
    description = BundleDescription(
        labels=tuple(labels),
        modalities=model.config.modalities,
        embed_dim=model.config.embed_dim,
        components=specs,
        preprocessing=preprocessing,
        streaming=streaming(parts, preprocessing),
        metrics=metrics,
        producer=producer(),
        privacy=privacy,
    )
    description.check()
    return description


def write_description(folder: Path, description: BundleDescription) -> None:
    (folder / DESCRIPTION_FILE).write_text(json.dumps(description.to_dict(), indent=2) + "\n")
