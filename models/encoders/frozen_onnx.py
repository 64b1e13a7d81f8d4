"""`--image-encoder onnx:PATH`: an image encoder the user brings as an ONNX graph, used frozen.

Many users have a pretrained encoder as an ONNX file already (exported with Optimum, tf2onnx or their own
torch.onnx code). Its graph becomes the front end of the image modality (polysense.preprocess.frozen states the
contract): data preparation copies it into the run byte for byte, records its sha256 and where it came from,
and runs it once per image; the runtime runs the same bytes from the bundle. What trains is this projection of
its vectors to --embed-dim, and export writes it as the image component with its parity check, as any other.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

from polysense.bundle.settings import FrozenGraph, ImageSettings
from polysense.errors import ConfigError
from polysense.models.registry import frozen_source, register_frozen
from polysense.preprocess.image import IMAGENET_MEAN, IMAGENET_STD

GRAPH_FILE = "image_frozen.onnx"  # its name in a run folder and a bundle


class FrozenVectorHead(nn.Module):
    """Vectors of a frozen encoder [B, D] -> embedding [B, embed_dim]. D is read from the first batch (or
    from the weights a run saved), so a model can be rebuilt from its config without the original file."""

    def __init__(self, embed_dim: int = 128) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.project = nn.Sequential(nn.Dropout(0.1), nn.LazyLinear(embed_dim))

    @property
    def input_width(self) -> int:
        """D, the frozen encoder's vector width (what export's example input needs)."""
        return self.project[1].in_features

    def fit_input_stats(self, vectors: list) -> None:
        """Called with the training split's vectors before training: sizes the projection (the training loop
        sets its layers trainable before any batch runs)."""
        with torch.no_grad():
            self.project(torch.zeros(1, vectors[0].shape[-1]))

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.project(vectors)


def frozen_image_settings(folder: Path, copy: bool, family: str, size: int) -> ImageSettings:
    """The image settings of `family` (onnx:PATH): the graph copied into `folder` and recorded with its sha256
    and the path it came from."""
    source = frozen_source(family)
    if not source.is_file():
        raise ConfigError(f"--image-encoder {family}: {source} is not a file; give the path of an ONNX graph")
    data = source.read_bytes()
    if copy:
        shutil.copyfile(source, folder / GRAPH_FILE)
    graph = FrozenGraph(
        "encoder", GRAPH_FILE, hashlib.sha256(data).hexdigest(), "", "", str(source.resolve())
    )
    return ImageSettings(size, IMAGENET_MEAN, IMAGENET_STD, (graph,))


@register_frozen("image")
def frozen_image(embed_dim: int = 128) -> FrozenVectorHead:
    return FrozenVectorHead(embed_dim)


frozen_image.front_end = frozen_image_settings
