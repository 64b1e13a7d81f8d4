"""What each exported graph is: a thin wrapper module, its input/output names, dynamic axes, example inputs.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)` at opset 17. Measured with torch 2.13
on these models: it exports each component in well under a second and keeps batch, text length and audio
frames dynamic for the GRU and convolution graphs used here; the dynamo exporter took up to 30 s for the
GRUs, fixed the batch at 1 when the example had batch 1, and failed on a dynamic time axis behind a strided
convolution. Whatever the exporter, parity is checked on several batch sizes and lengths after export
(see parity.py), so a silently fixed axis is caught.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from polysense.models.audio_causal import STATE_NAMES, CausalAudioEncoder
from polysense.models.model import MultimodalClassifier

OPSET = 17


class ImageEncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image)


class TextEncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids, mask)


class AudioEncoderGraph(nn.Module):
    """frames + the five state tensors in; embedding + the five new state tensors out."""

    def __init__(self, encoder: CausalAudioEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, frames: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, new_state = self.encoder(frames, tuple(state))
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

    def example(self, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Random inputs of the given batch size (and text length / audio frames)."""
        return EXAMPLES[self.name](self, batch, length, generator)


def _image_example(component: Component, batch: int, length: int, generator: torch.Generator) -> tuple:
    size = component.module.image_size
    return (torch.randn(batch, 3, size, size, generator=generator),)


def _text_example(component: Component, batch: int, length: int, generator: torch.Generator) -> tuple:
    vocab = component.module.encoder.tokens.num_embeddings
    ids = torch.randint(2, vocab, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length  # one row uses the whole width
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return ids * mask, mask


def _audio_example(component: Component, batch: int, length: int, generator: torch.Generator) -> tuple:
    encoder: CausalAudioEncoder = component.module.encoder

    # Random frames on the scale of the training data (per-band mean and std), as log-mel frames are; unit
    # noise on a band with a tiny std would be thousands of standard deviations out.
    def frames_of(count: int) -> torch.Tensor:
        noise = torch.randn(batch, count, encoder.n_mels, generator=generator)
        return noise * encoder.input_std + encoder.input_mean

    frames = frames_of(length)
    # A state as a stream would carry it: the state after some random earlier frames.
    with torch.no_grad():
        _, state = encoder(frames_of(7))
    return (frames, *state)


def _fusion_example(component: Component, batch: int, length: int, generator: torch.Generator) -> tuple:
    modalities = len(component.inputs) - 1
    embed_dim = component.module.embed_dim
    embeddings = [torch.randn(batch, embed_dim, generator=generator) for _ in range(modalities)]
    mask = (torch.rand(batch, modalities, generator=generator) < 0.6).float()
    mask[:, 0] = torch.where(mask.sum(1) == 0, 1.0, mask[:, 0])  # at least one present
    return (*[e * mask[:, i : i + 1] for i, e in enumerate(embeddings)], mask)


EXAMPLES = {
    "image_encoder": _image_example,
    "text_encoder": _text_example,
    "audio_encoder": _audio_example,
    "fusion": _fusion_example,
}


def components(model: MultimodalClassifier, image_size: int) -> list[Component]:
    """The graphs to export for a trained model, encoders in canonical modality order, then the fusion."""
    model = model.eval()
    found = []
    for modality in model.config.modalities:
        encoder = model.encoders[modality]
        if modality == "image":
            module = ImageEncoderGraph(encoder)
            module.image_size = image_size
            found.append(
                Component(
                    "image_encoder",
                    "image",
                    module,
                    ["image"],
                    ["embedding"],
                    {"image": {0: "batch"}, "embedding": {0: "batch"}},
                )
            )
        elif modality == "text":
            found.append(
                Component(
                    "text_encoder",
                    "text",
                    TextEncoderGraph(encoder),
                    ["ids", "mask"],
                    ["embedding"],
                    {
                        "ids": {0: "batch", 1: "length"},
                        "mask": {0: "batch", 1: "length"},
                        "embedding": {0: "batch"},
                    },
                )
            )
        else:
            state_in = list(STATE_NAMES)
            state_out = [f"{name}_out" for name in STATE_NAMES]
            axes = {"frames": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}}
            for name in state_in + state_out:
                axes[name] = {1: "batch"} if name.startswith("gru_hidden") else {0: "batch"}
            found.append(
                Component(
                    "audio_encoder",
                    "audio",
                    AudioEncoderGraph(encoder),
                    ["frames", *state_in],
                    ["embedding", *state_out],
                    axes,
                )
            )
    fusion = FusionGraph(model.fusion)
    fusion.embed_dim = model.config.embed_dim
    inputs = [f"embedding_{m}" for m in model.config.modalities] + ["mask"]
    axes = {name: {0: "batch"} for name in [*inputs, "logits"]}
    found.append(Component("fusion", None, fusion, inputs, ["logits"], axes))
    for component in found:
        # A new wrapper starts in training mode, and the exporter restores that mode recursively after
        # exporting, which would switch the wrapped encoder's BatchNorm and dropout back to training.
        component.module.eval()
    return found
