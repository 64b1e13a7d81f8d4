"""Small building blocks shared by encoder families and fusion heads."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [B, L, C] over positions where mask [B, L] is 1 (zeros for an all-zero row)."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


_MASKED = -1e9  # added to the attention logits of padding keys: softmax gives them exactly 0 (no NaN)


class SelfAttention(nn.Module):
    """Multi-head self-attention written with reshapes that keep every length dynamic in ONNX
    (nn.MultiheadAttention's export bakes the example's sequence length into its Reshape nodes)."""

    def __init__(self, model_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if model_dim % heads:
            raise ValueError(f"model_dim {model_dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, model_dim // heads
        self.qkv = nn.Linear(model_dim, 3 * model_dim)
        self.out = nn.Linear(model_dim, model_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """x [B, L, C]; padding [B, L], True where a position is padding (never attended to)."""
        batch = x.shape[0]
        q, k, v = self.qkv(x).reshape(batch, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) * self.head_dim**-0.5  # [B, H, L, L]
        logits = logits + padding[:, None, None, :].to(x.dtype) * _MASKED
        weights = self.dropout(torch.softmax(logits, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer: x + attention(norm(x)), then x + feed-forward(norm(x))."""

    def __init__(self, model_dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(model_dim), nn.LayerNorm(model_dim)
        self.attention = SelfAttention(model_dim, heads, dropout)
        self.feed_forward = nn.Sequential(
            nn.Linear(model_dim, 2 * model_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(2 * model_dim, model_dim),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), padding))
        return x + self.dropout(self.feed_forward(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """A stack of pre-norm encoder layers (batch first, feed-forward 2 x model_dim)."""

    def __init__(self, model_dim: int, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(model_dim, heads, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, src_key_padding_mask)
        return x


def transformer_encoder(model_dim: int, layers: int, heads: int, dropout: float) -> TransformerEncoder:
    """Pre-norm Transformer encoder layers (batch first, feed-forward 2 x model_dim), exportable to ONNX with
    dynamic batch and length, and exact under padding."""
    return TransformerEncoder(model_dim, layers, heads, dropout)
