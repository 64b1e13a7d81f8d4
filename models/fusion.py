"""Fusion heads (concat, attention, transformer, reliability): per-modality embeddings [B, M, D] + presence mask [B, M] (1 = present) -> logits [B, C].

Every head ignores absent modalities exactly: whatever the embedding of an absent modality holds, the output
is the same (a test checks this for every head and every subset).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from polysense.models.blocks import transformer_encoder
from polysense.models.registry import register_fusion

_MASKED = (
    -1e4
)  # a logit that softmax turns into exactly 0 next to real ones, without the NaN that -inf can give


class ConcatFusion(nn.Module):
    """MLP over the concatenated embeddings (absent ones zeroed) and the mask itself."""

    def __init__(
        self, num_modalities: int, embed_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.1
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(num_modalities * embed_dim + num_modalities, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(embeddings.dtype)
        zeroed = embeddings * mask.unsqueeze(-1)
        return self.mlp(torch.cat([zeroed.flatten(1), mask], dim=1))


class AttentionFusion(nn.Module):
    """Learned per-sample modality weights (softmax over present modalities) pooling projected embeddings."""

    def __init__(
        self, num_modalities: int, embed_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.1
    ):
        super().__init__()
        self.modality_embedding = nn.Parameter(torch.zeros(num_modalities, embed_dim))
        self.value = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(inplace=True))
        self.score = nn.Linear(hidden, 1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = self.value(embeddings + self.modality_embedding)
        scores = self.score(values).squeeze(-1).masked_fill(mask == 0, _MASKED)
        weights = torch.softmax(scores, dim=1) * mask.to(embeddings.dtype)
        return self.classifier((weights.unsqueeze(-1) * values).sum(dim=1))


class TransformerFusion(nn.Module):
    """Cross-modal interaction: a CLS token and one token per modality through a Transformer encoder;
    absent modalities are padding (never attended to); the CLS output is classified."""

    def __init__(
        self,
        num_modalities: int,
        embed_dim: int,
        num_classes: int,
        model_dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.project = nn.Linear(embed_dim, model_dim)
        self.modality_embedding = nn.Parameter(torch.randn(num_modalities, model_dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, model_dim) * 0.02)
        self.encoder = transformer_encoder(model_dim, layers, heads, dropout)
        self.norm = nn.LayerNorm(model_dim)
        self.classifier = nn.Linear(model_dim, num_classes)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.project(embeddings) + self.modality_embedding
        tokens = torch.cat([self.cls.expand(embeddings.shape[0], -1, -1), tokens], dim=1)
        padding = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1) == 0
        return self.classifier(self.norm(self.encoder(tokens, src_key_padding_mask=padding)[:, 0]))


class ReliabilityFusion(nn.Module):
    """Calibrated late fusion: each present modality classifies on its own, and the fused log-probabilities are
    the sum of theirs, each scaled by a reliability the head reads from that modality's embedding:

        logits = sum over present m of  r_m(e_m) * log_softmax(W_m e_m)      r_m = softplus(a_m . e_m + b_m)

    A product of experts with per-sample temperatures: a modality whose embedding looks unlike what it was
    trained to trust (noise, an unheard voice under augmentation) can be turned down instead of outvoting the
    others, and an unsure modality's flat distribution moves the sum little. Absent modalities add nothing.
    """

    def __init__(self, num_modalities: int, embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifiers = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(num_modalities))
        self.reliability = nn.ModuleList(nn.Linear(embed_dim, 1) for _ in range(num_modalities))
        for gate in self.reliability:  # start every modality at weight 1: softplus(log(e - 1)) = 1
            nn.init.zeros_(gate.weight)
            nn.init.constant_(gate.bias, math.log(math.e - 1))

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(embeddings.dtype)
        total = None
        for index, (classify, gate) in enumerate(zip(self.classifiers, self.reliability)):
            embedding = self.dropout(embeddings[:, index])
            weight = nn.functional.softplus(gate(embedding)) * mask[:, index : index + 1]
            vote = weight * torch.log_softmax(classify(embedding), dim=-1)
            total = vote if total is None else total + vote
        return total


@register_fusion("concat")
def concat(num_modalities: int, embed_dim: int, num_classes: int) -> ConcatFusion:
    return ConcatFusion(num_modalities, embed_dim, num_classes)


@register_fusion("attention")
def attention(num_modalities: int, embed_dim: int, num_classes: int) -> AttentionFusion:
    return AttentionFusion(num_modalities, embed_dim, num_classes)


@register_fusion("transformer")
def transformer(num_modalities: int, embed_dim: int, num_classes: int) -> TransformerFusion:
    return TransformerFusion(num_modalities, embed_dim, num_classes)


@register_fusion("reliability")
def reliability(num_modalities: int, embed_dim: int, num_classes: int) -> ReliabilityFusion:
    return ReliabilityFusion(num_modalities, embed_dim, num_classes)
