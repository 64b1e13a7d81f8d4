"""The training losses: fused cross-entropy under modality dropout, and the encoders' own losses.

Each loss is a mean over the rows of the optimizer step's whole batch, which may be split among processes and
micro-batches: a piece computes sums over its own rows and divides by counts over the whole batch (BatchShare),
so the gradients summed over micro-batches and averaged over processes are those of the whole batch at once.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from polysense.models.model import MultimodalClassifier
from polysense.models.training.dataset import modality_dropout


@dataclass(frozen=True)
class BatchShare:
    """What a piece of a batch needs to know about the whole batch of its optimizer step."""

    rows: int  # samples in the whole batch
    modality_rows: tuple[int, ...]  # samples of the whole batch that have each modality (model order)
    processes: int = 1  # DistributedDataParallel averages gradients over processes: sums are scaled back up

    @classmethod
    def whole(cls, batch: dict) -> BatchShare:
        """The batch is the whole batch (one process, no accumulation)."""
        present = batch["present"]
        return cls(int(present.shape[0]), tuple(int(n) for n in (present > 0).sum(dim=0).tolist()))

    def has(self, index: int) -> bool:
        """Whether any sample of the whole batch has modality `index` (every piece decides alike)."""
        return self.modality_rows[index] > 0

    def mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        """This piece's part of a mean over `count` samples of the whole batch, given its sum `total`."""
        return total * (self.processes / count)


def fused_loss(
    model: MultimodalClassifier,
    heads: nn.ModuleDict,
    batch: dict,
    dropout: float,
    aux_loss_weight: float,
    generators: Sequence[torch.Generator],
    share: BatchShare,
    embeddings: dict[str, torch.Tensor] | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of the fusion under modality dropout (share `dropout` of the samples; `generators`: one
    per row), plus (aux_loss_weight) each encoder's own cross-entropy through its linear head on every sample
    that has the modality: without it the encoder of the stronger modality does the work and the others stay
    weak, which shows when a modality is missing. `embeddings` (per modality, already encoded) skips the
    encoders."""
    available = batch["present"]
    present = modality_dropout(available, dropout, generators)
    rows = available.shape[0]
    raw, stacked = {}, []
    for index, modality in enumerate(model.config.modalities):
        if share.has(index):
            raw[modality] = embeddings[modality] if embeddings is not None else model.encode(modality, batch)
            stacked.append(raw[modality] * present[:, index : index + 1])
        else:
            stacked.append(available.new_zeros(rows, model.config.embed_dim))
    logits = model.fusion(torch.stack(stacked, dim=1), present)
    loss = share.mean(
        F.cross_entropy(logits, batch["labels"], reduction="sum", label_smoothing=label_smoothing), share.rows
    )
    if aux_loss_weight > 0 and raw:  # the mean over the encoded modalities of each one's own loss
        own = _per_modality_losses(model, heads, batch, raw, share, label_smoothing)
        loss = loss + aux_loss_weight * own / len(raw)
    return loss


def _per_modality_losses(
    model: MultimodalClassifier,
    heads: nn.ModuleDict,
    batch: dict,
    raw: dict[str, torch.Tensor],
    share: BatchShare,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Sum over the modalities in `raw` of each head's mean cross-entropy over the samples that have it.

    Computed on every row and masked, not on the rows that have the modality: a piece of the batch without any
    of them still uses the encoder and its head, so every process runs the same collectives (a BatchNorm's
    all_reduce in the backward pass) whichever rows it got."""
    total = batch["labels"].new_zeros((), dtype=torch.float32)
    for index, modality in enumerate(model.config.modalities):
        if modality in raw:
            logits = heads[modality](raw[modality])
            losses = F.cross_entropy(
                logits, batch["labels"], reduction="none", label_smoothing=label_smoothing
            )
            has = batch["present"][:, index].to(losses.dtype)
            total = total + share.mean((losses * has).sum(), share.modality_rows[index])
    return total


def unimodal_loss(
    model: MultimodalClassifier,
    heads: nn.ModuleDict,
    batch: dict,
    share: BatchShare,
    label_smoothing: float = 0.0,
    only: Collection[str] | None = None,
) -> torch.Tensor:
    """Staged pre-training: each encoder (of `only`, default all) with its own linear head, on the samples
    that have its modality."""
    raw = {
        m: model.encode(m, batch)
        for i, m in enumerate(model.config.modalities)
        if share.has(i) and (only is None or m in only)
    }
    return _per_modality_losses(model, heads, batch, raw, share, label_smoothing)


def alternating_loss(
    model: MultimodalClassifier,
    heads: nn.ModuleDict,
    batch: dict,
    step: int,
    dropout: float,
    generators: Sequence[torch.Generator],
    share: BatchShare,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """--strategy alternating: even steps train the modality branches (each encoder through its own head), odd
    steps the fusion on the encoders' current embeddings (the encoders get no gradient, so the optimizer leaves
    them alone)."""
    if step % 2 == 0:
        return unimodal_loss(model, heads, batch, share, label_smoothing)
    with torch.no_grad():  # the fusion's turn: embeddings as constants, no backward through the encoders
        modalities = model.config.modalities
        embeddings = {m: model.encode(m, batch) for i, m in enumerate(modalities) if share.has(i)}
    return fused_loss(
        model,
        heads,
        batch,
        dropout,
        0.0,
        generators,
        share,
        embeddings=embeddings,
        label_smoothing=label_smoothing,
    )
