"""Small building blocks shared by encoder families and fusion heads."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, L, C] over positions where mask [B, L] is 1 (zeros for an all-zero row)."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def transformer_encoder(model_dim: int, layers: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    """Pre-norm Transformer encoder layers (batch first, feed-forward 2 x model_dim)."""
    layer = nn.TransformerEncoderLayer(
        model_dim, heads, 2 * model_dim, dropout, batch_first=True, norm_first=True
    )
    # No nested-tensor fast path: it changes numerics with the amount of padding.
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
