"""Text encoders over token ids [B, L] and attention mask [B, L]; both exact for any padding length."""

from __future__ import annotations

import torch
from torch import nn

from polysense.models.blocks import masked_mean, transformer_encoder
from polysense.models.registry import register_encoder
from polysense.preprocess.text import PAD_ID


def reverse_within_length(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """Gather indices [B, L] that reverse each row's first `length` positions and keep the padding in place.

    The permutation is its own inverse. It lets a plain forward GRU read each text backwards without
    pack_padded_sequence (which ONNX exporters handle poorly), so padding never leaks into the result.
    """
    positions = torch.arange(max_length, device=lengths.device).unsqueeze(0)
    lengths = lengths.unsqueeze(1)
    return torch.where(positions < lengths, lengths - 1 - positions, positions)


class TextBiGRU(nn.Module):
    """Embedding + bidirectional GRU (two explicit directions) + masked mean pooling."""

    def __init__(self, vocab_size: int, embed_dim: int = 128, token_dim: int = 64, hidden: int = 96) -> None:
        super().__init__()
        self.embed_dim, self.vocab_size = embed_dim, vocab_size
        self.tokens = nn.Embedding(vocab_size, token_dim, padding_idx=PAD_ID)
        self.forward_gru = nn.GRU(token_dim, hidden, batch_first=True)
        self.backward_gru = nn.GRU(token_dim, hidden, batch_first=True)
        self.project = nn.Linear(2 * hidden, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids)
        forward_out, _ = self.forward_gru(x)
        order = reverse_within_length(mask.sum(dim=1), ids.shape[1]).unsqueeze(-1)
        reversed_out, _ = self.backward_gru(torch.gather(x, 1, order.expand(-1, -1, x.shape[2])))
        backward_out = torch.gather(reversed_out, 1, order.expand(-1, -1, reversed_out.shape[2]))
        return self.project(masked_mean(torch.cat([forward_out, backward_out], dim=2), mask))


class TextTransformer(nn.Module):
    """Embedding + learned positions + a small pre-norm Transformer encoder + masked mean pooling."""

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int = 128,
        model_dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        max_positions: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed_dim, self.vocab_size = embed_dim, vocab_size
        self.tokens = nn.Embedding(vocab_size, model_dim, padding_idx=PAD_ID)
        self.positions = nn.Embedding(max_positions, model_dim)
        self.encoder = transformer_encoder(model_dim, layers, heads, dropout)
        self.norm = nn.LayerNorm(model_dim)
        self.project = nn.Linear(model_dim, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        x = self.tokens(ids) + self.positions(positions)
        x = self.encoder(x, src_key_padding_mask=mask == 0)
        return self.project(masked_mean(self.norm(x), mask))


@register_encoder("text", "gru")
def gru(vocab_size: int, embed_dim: int = 128) -> TextBiGRU:
    return TextBiGRU(vocab_size, embed_dim)


@register_encoder("text", "transformer")
def transformer(vocab_size: int, embed_dim: int = 128, max_positions: int = 512) -> TextTransformer:
    return TextTransformer(vocab_size, embed_dim, max_positions=max_positions)
