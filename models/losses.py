"""The training losses: fused cross-entropy under modality dropout, and the encoders' own losses."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from polysense.models.dataset import modality_dropout
from polysense.models.model import MultimodalClassifier


def fused_loss(
    model: MultimodalClassifier,
    heads: nn.ModuleDict,
    batch: dict,
    dropout: float,
    aux_loss_weight: float,
    generator: torch.Generator,
    embeddings: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Cross-entropy of the fusion under modality dropout (share `dropout` of the samples), plus
    (aux_loss_weight) each encoder's own cross-entropy through its linear head on every sample that has the
    modality: without it the encoder of the stronger modality does the work and the others stay weak, which
    shows when a modality is missing. `embeddings` (per modality, already encoded) skips the encoders."""
    available = batch["present"]
    present = modality_dropout(available, dropout, generator)
    rows = available.shape[0]
    raw, stacked = {}, []
    for index, modality in enumerate(model.config.modalities):
        if available[:, index].any():
            raw[modality] = embeddings[modality] if embeddings is not None else model.encode(modality, batch)
            stacked.append(raw[modality] * present[:, index : index + 1])
        else:
            stacked.append(available.new_zeros(rows, model.config.embed_dim))
    loss = F.cross_entropy(model.fusion(torch.stack(stacked, dim=1), present), batch["labels"])
    if aux_loss_weight > 0 and raw:
        loss = loss + aux_loss_weight * _auxiliary_loss(model, heads, batch, raw)
    return loss


def _auxiliary_loss(
    model: MultimodalClassifier, heads: nn.ModuleDict, batch: dict, raw: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Mean over the encoded modalities of each head's cross-entropy on the samples that have it."""
    available, losses = batch["present"], []
    for index, modality in enumerate(model.config.modalities):
        has = available[:, index] > 0
        if modality in raw and has.any():
            losses.append(F.cross_entropy(heads[modality](raw[modality][has]), batch["labels"][has]))
    return torch.stack(losses).mean()


def unimodal_loss(model: MultimodalClassifier, heads: nn.ModuleDict, batch: dict) -> torch.Tensor:
    """Staged pre-training: each encoder with its own linear head, on the samples that have its modality."""
    losses = []
    for index, modality in enumerate(model.config.modalities):
        rows = batch["present"][:, index] > 0
        if rows.any():
            logits = heads[modality](model.encode(modality, batch))[rows]
            losses.append(F.cross_entropy(logits, batch["labels"][rows]))
    return torch.stack(losses).sum()


def alternating_loss(
    model: MultimodalClassifier,
    heads: nn.ModuleDict,
    batch: dict,
    step: int,
    dropout: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """--strategy alternating: even steps train the modality branches (each encoder through its own head), odd
    steps the fusion on the encoders' current embeddings (the encoders get no gradient, so the optimizer leaves
    them alone)."""
    if step % 2 == 0:
        return unimodal_loss(model, heads, batch)
    with torch.no_grad():  # the fusion's turn: embeddings as constants, no backward through the encoders
        present = batch["present"].any(dim=0).tolist()
        embeddings = {m: model.encode(m, batch) for m, has in zip(model.config.modalities, present) if has}
    return fused_loss(model, heads, batch, dropout, 0.0, generator, embeddings=embeddings)
