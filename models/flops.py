"""Count multiply-accumulates of convolution and linear layers with forward hooks (FLOPs = 2 x MACs)."""

from __future__ import annotations

import torch
from torch import nn


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of Conv1d/Conv2d/Linear layers for one forward pass over `inputs` (batch included)."""
    total = 0

    def hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
            per_output = layer.in_channels // layer.groups
            for size in layer.kernel_size:
                per_output *= size
            total += output.numel() * per_output
        elif isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total
