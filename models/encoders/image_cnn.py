"""Compact image CNN: six 3x3 conv-BN-ReLU layers, three of them stride 2, global average pooling."""

from __future__ import annotations

import torch
from torch import nn

from polysense.models.registry import register_encoder


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImageCNN(nn.Module):
    """[B, 3, H, W] normalised RGB -> [B, embed_dim]. Any H, W >= 8 works (global pooling)."""

    # Dense convolutions: static QDQ int8 (dynamic quantization would give slow ConvInteger); see export.
    int8_method = "static"

    def __init__(self, width: int = 24, embed_dim: int = 128) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.features = nn.Sequential(
            _conv_bn_relu(3, width, 2),
            _conv_bn_relu(width, width, 1),
            _conv_bn_relu(width, 2 * width, 2),
            _conv_bn_relu(2 * width, 2 * width, 1),
            _conv_bn_relu(2 * width, 4 * width, 2),
            _conv_bn_relu(4 * width, 4 * width, 1),
        )
        self.project = nn.Linear(4 * width, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images).mean(dim=(2, 3)))


@register_encoder("image", "cnn")
def cnn(embed_dim: int = 128, image_width: int = 24) -> ImageCNN:
    return ImageCNN(width=image_width, embed_dim=embed_dim)
