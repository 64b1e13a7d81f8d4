"""The multimodal classifier: one encoder per modality, a fusion head, and its configuration."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from polysense.errors import ConfigError
from polysense.modalities import MODALITIES, SPECS, check_modalities

# Importing the families registers them.
from polysense.models import fusion  # noqa: F401
from polysense.models.encoders import (  # noqa: F401
    audio_causal,
    audio_window,
    efficientnet_lite,
    frozen_onnx,
    image_cnn,
    minilm,
    speech_embedding,
    text_encoders,
)
from polysense.models.registry import create_encoder, create_fusion, family_takes


@dataclass(frozen=True)
class ModelConfig:
    modalities: tuple[str, ...]  # present in the model, canonical order (image, text, audio)
    num_classes: int
    embed_dim: int = 128  # every encoder's output size
    image_family: str = "cnn"  # encoder family per modality (polysense.models.ENCODERS)
    image_width: int = 24  # channels of the CNN's first stage (then 2x, 4x)
    text_family: str = "gru"  # gru | transformer
    vocab_size: int = 0  # set from the trained tokenizer
    max_text_length: int = 64  # tokens; also the transformer's position table size
    audio_family: str = "causal"
    n_mels: int = 40
    audio_norm_frames: int = 0  # causal running normalisation of the audio encoder (0: off, as older runs)
    fusion: str = "concat"  # concat | attention | transformer | reliability
    pretrained: bool = True  # families with pretrained weights start from them (False: random weights)
    group_norm: bool = False  # every BatchNorm of the encoders is a GroupNorm (trained under --dp-epsilon)
    # Per modality, what a pruned encoder keeps (its family's structure(): MiniLM's heads and feed-forward units
    # per layer, EfficientNet-Lite0's channels per block); {}: nothing pruned. polysense.models.pruning.
    pruned: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", check_modalities(self.modalities))
        for modality in self.pruned:
            family = self.encoder_family(modality) if modality in self.modalities else None
            if family is None or not family_takes(modality, family, "pruned"):
                raise ConfigError(
                    f"the model config records a pruned {modality} encoder, which its {family or 'absent'} "
                    "encoder cannot be; the run folder is damaged: prune the unpruned run again"
                )

    def encoder_options(self) -> dict:
        """Options offered to every encoder family; each family takes those its factory names."""
        return {
            "embed_dim": self.embed_dim,
            "image_width": self.image_width,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_text_length,
            "n_mels": self.n_mels,
            "audio_norm_frames": self.audio_norm_frames,
            "pretrained": self.pretrained,
        }

    def encoder_family(self, modality: str) -> str:
        return getattr(self, f"{modality}_family")

    def to_dict(self) -> dict:
        return {**asdict(self), "modalities": list(self.modalities)}

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        # Runs made before the families were named so stored them as image_encoder, text_encoder, ...
        renamed = {f"{m}_encoder": f"{m}_family" for m in MODALITIES}
        values = {renamed.get(key, key): value for key, value in values.items()}
        return cls(**{**values, "modalities": tuple(values["modalities"])})


class MultimodalClassifier(nn.Module):
    def __init__(self, config: ModelConfig, load_pretrained: bool = True) -> None:
        """`load_pretrained=False` when a checkpoint's weights replace them anyway (export, evaluation), so
        loading a trained run does not need the pretrained weight packages."""
        super().__init__()
        self.config = config
        options = {**config.encoder_options(), "pretrained": config.pretrained and load_pretrained}
        self.encoders = nn.ModuleDict(
            {
                m: create_encoder(m, config.encoder_family(m), **options, pruned=config.pruned.get(m))
                for m in config.modalities
            }
        )
        if config.group_norm:
            _batchnorm_to_groupnorm(self.encoders)
        self.fusion = create_fusion(
            config.fusion,
            num_modalities=len(config.modalities),
            embed_dim=config.embed_dim,
            num_classes=config.num_classes,
        )

    def encode(self, modality: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embedding [B, D] of one modality from a collated batch (the modality's batch keys, in order)."""
        encoder = self.encoders[modality]
        inputs = (batch[key] for key in SPECS[modality].batch_keys)
        if getattr(encoder, "channels_last", False):
            inputs = (_channels_last(tensor) for tensor in inputs)
        return encoder(*inputs)

    def use_channels_last(self) -> None:
        """Move the weights of the encoders that ask for it (`channels_last`, see polysense.models.registry) to
        channels-last layout, as encode() lays out their images: CPU convolution kernels (oneDNN) run fastest
        so: a training step of EfficientNet-Lite0 ran 1.6-2.1x faster at 128-224 px (make bench-channels-last).
        Values are the same up to the order of float sums; export traces the encoders in their default
        layout, so bundles do not change."""
        for encoder in self.encoders.values():
            if getattr(encoder, "channels_last", False):
                encoder.to(memory_format=torch.channels_last)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, M, D]; rows whose modality is absent hold zeros (encoders run only where some row has it)."""
        present = batch["present"]
        rows = present.shape[0]
        embeddings = []
        for index, modality in enumerate(self.config.modalities):
            if present[:, index].any():
                embeddings.append(self.encode(modality, batch) * present[:, index : index + 1])
            else:
                embeddings.append(present.new_zeros(rows, self.config.embed_dim))
        return torch.stack(embeddings, dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fusion(self.embed(batch), batch["present"])


GROUP_NORM_GROUPS = 8  # at most; fewer where the channels do not divide into 8 (gcd)


def _batchnorm_to_groupnorm(module: nn.Module) -> None:
    """Replace, in place, every BatchNorm by a GroupNorm over the same channels (gcd(channels, 8) groups, same
    eps and affine): BatchNorm mixes the rows of a batch, so a row's gradient is not its own and differential
    privacy cannot clip it (opacus's ModuleValidator.fix makes the same swap with min(32, channels) groups, into
    which the small CNN's 48 channels do not divide)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                groups = math.gcd(child.num_features, GROUP_NORM_GROUPS)
                setattr(parent, name, nn.GroupNorm(groups, child.num_features, child.eps, child.affine))


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor
