"""What each exported graph is: a thin wrapper module, its input/output names, dynamic axes, example inputs.

Names and dynamic axes of an encoder's inputs come from the modality table (polysense.modalities.SPECS); a
streaming encoder adds its state tensors (from the encoder's own `state_layout()`) as inputs and outputs.
Example inputs, which only export needs, are built per modality by EXAMPLES below.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)` at opset 17. Measured with torch 2.13
on these models: it exports each component in well under a second and keeps batch, text length and audio
frames dynamic for the GRU and convolution graphs used here; the dynamo exporter took up to 30 s for the
GRUs, fixed the batch at 1 when the example had batch 1, and failed on a dynamic time axis behind a strided
convolution. Whatever the exporter, parity is checked on several batch sizes and lengths after export
(see parity.py), so a silently fixed axis is caught.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from polysense.bundle.schema import FUSION, StateTensor
from polysense.modalities import SPECS, component_name
from polysense.models.model import MultimodalClassifier

OPSET = 17


class EncoderGraph(nn.Module):
    """An encoder as one graph: its inputs in, the embedding out."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder(*inputs)


class StreamingEncoderGraph(nn.Module):
    """A streaming encoder as one graph: new frames + the state tensors in; embedding + new state out."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, frames: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, new_state = self.encoder.step(frames, tuple(state))
        return (embedding, *new_state)


class FusionGraph(nn.Module):
    """One embedding input per modality (so encoder outputs can stay on the device) + mask -> logits."""

    def __init__(self, fusion: nn.Module) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, *embeddings_and_mask: torch.Tensor) -> torch.Tensor:
        *embeddings, mask = embeddings_and_mask
        return self.fusion(torch.stack(embeddings, dim=1), mask)


@dataclass
class Component:
    name: str  # image_encoder | text_encoder | audio_encoder | fusion
    modality: str | None  # None for the fusion head
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    example_builder: Callable[[int, int, torch.Generator], tuple[torch.Tensor, ...]]
    state: tuple[StateTensor, ...] = ()  # a streaming encoder's state tensors
    # The int8 method the encoder family asks for: "static" (QDQ, calibrated; for dense convolutions, where
    # dynamic quantization gives slow ConvInteger) or "dynamic" (per-channel MatMul/Gemm and embedding tables).
    int8_method: str = "dynamic"
    # Entered while exporting the graph that int8 quantizes, where it differs from the fp32 graph (MiniLM:
    # onnxruntime's fused attention); None quantizes the fp32 graph.
    int8_export: Callable[[], AbstractContextManager] | None = None

    @property
    def has_length_axis(self) -> bool:
        """True when an input has a dynamic axis besides the batch (text tokens, audio frames)."""
        return any(set(axes.values()) - {"batch"} for axes in self.dynamic_axes.values())

    def example(self, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Random inputs of the given batch size (and text length / audio frames)."""
        return self.example_builder(batch, length, generator)


def _image_example(encoder: nn.Module, image_size: int) -> Callable:
    def build(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        width = getattr(encoder, "input_width", None)  # a frozen encoder's vectors (onnx:PATH)
        if width is not None:
            return (torch.randn(batch, width, generator=generator),)
        return (torch.randn(batch, 3, image_size, image_size, generator=generator),)

    return build


def _text_example(encoder: nn.Module, image_size: int) -> Callable:
    def build(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        width = getattr(encoder, "input_width", None)  # a frozen encoder's vectors (onnx:PATH)
        if width is not None:
            return (torch.randn(batch, width, generator=generator),)
        ids = torch.randint(2, encoder.vocab_size, (batch, length), generator=generator)
        lengths = torch.randint(1, length + 1, (batch,), generator=generator)
        lengths[0] = length  # one row uses the whole width
        mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return ids * mask, mask

    return build


def _audio_example(encoder: nn.Module, image_size: int) -> Callable:
    # Random frames on the scale of the training data (per-band mean and std), as log-mel frames are; unit
    # noise on a band with a tiny std would be thousands of standard deviations out.
    def frames_of(batch: int, count: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(batch, count, encoder.n_mels, generator=generator)
        return noise * encoder.input_std + encoder.input_mean

    def build(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        frames = frames_of(batch, length, generator)
        # A state as a stream would carry it: the state after some random earlier frames.
        with torch.no_grad():
            _, state = encoder.step(frames_of(batch, 7, generator))
        return (frames, *state)

    return build


# modality -> (encoder, image size) -> example builder; the one place export needs per modality.
EXAMPLES: dict[str, Callable[[nn.Module, int], Callable]] = {
    "image": _image_example,
    "text": _text_example,
    "audio": _audio_example,
}


def _fusion_example(modalities: int, embed_dim: int) -> Callable:
    def build(batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        embeddings = [torch.randn(batch, embed_dim, generator=generator) for _ in range(modalities)]
        mask = (torch.rand(batch, modalities, generator=generator) < 0.6).float()
        mask[:, 0] = torch.where(mask.sum(1) == 0, 1.0, mask[:, 0])  # at least one present
        return (*[e * mask[:, i : i + 1] for i, e in enumerate(embeddings)], mask)

    return build


def encoder_component(modality: str, encoder: nn.Module, image_size: int) -> Component:
    spec = SPECS[modality]
    # The modality's inputs, or the encoder's own (a frozen text encoder's vectors: TextVectorHead).
    inputs = getattr(encoder, "graph_inputs", spec.dynamic_axes)
    axes = {**inputs, "embedding": {0: "batch"}}
    example = EXAMPLES[modality](encoder, image_size)
    int8_method = getattr(encoder, "int8_method", "dynamic")
    int8_export = getattr(encoder, "int8_export", None)
    name = component_name(modality)
    if not spec.streaming:
        graph = EncoderGraph(encoder)
        return Component(
            name, modality, graph, list(inputs), ["embedding"], axes, example, (), int8_method, int8_export
        )
    state = tuple(StateTensor(name, shape, axis) for name, (shape, axis) in encoder.state_layout().items())
    for tensor in state:
        axes[tensor.name] = axes[tensor.output_name] = {tensor.batch_axis: "batch"}
    return Component(
        component_name(modality),
        modality,
        StreamingEncoderGraph(encoder),
        [*inputs, *(t.name for t in state)],
        ["embedding", *(t.output_name for t in state)],
        axes,
        example,
        state,
        int8_method,
        int8_export,
    )


def components(model: MultimodalClassifier, image_size: int) -> list[Component]:
    """The graphs to export for a trained model, encoders in canonical modality order, then the fusion."""
    model = model.eval()
    found = [encoder_component(m, model.encoders[m], image_size) for m in model.config.modalities]
    inputs = [f"embedding_{m}" for m in model.config.modalities] + ["mask"]
    axes = {name: {0: "batch"} for name in [*inputs, "logits"]}
    example = _fusion_example(len(model.config.modalities), model.config.embed_dim)
    found.append(Component(FUSION, None, FusionGraph(model.fusion), inputs, ["logits"], axes, example))
    for component in found:
        # A new wrapper starts in training mode, and the exporter restores that mode recursively after
        # exporting, which would switch the wrapped encoder's BatchNorm and dropout back to training.
        component.module.eval()
    return found
