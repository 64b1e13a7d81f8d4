"""One training epoch on this process's share of every batch, with the phase's loss.

With one process and no --accumulate the batch is one piece; otherwise each process runs its pieces
(polysense.models.training.distributed.sharding) and DistributedDataParallel averages the gradients. The losses divide by counts
over the whole batch (losses.BatchShare), every random draw for a sample comes from the sample's own generator
(dataset.row_generators), and BatchNorm and Dropout see the whole batch (sharded_layers), so the step is the
one a single process would take on the whole batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from polysense.bundle.settings import Preprocessing
from polysense.models.model import MultimodalClassifier
from polysense.models.training.augment import augment_batch
from polysense.models.training.dataset import FeatureSet, row_generators
from polysense.models.training.distributed.processes import World, sum_over_processes
from polysense.models.training.distributed.sharded_layers import StepContext
from polysense.models.training.distributed.sharding import Piece, pieces
from polysense.models.training.losses import BatchShare, alternating_loss, fused_loss, unimodal_loss
from polysense.models.training.options import TrainOptions
from polysense.models.training.privacy import PerSampleShare, PrivateTraining


class TrainingObjective(nn.Module):
    """The model, its per-modality heads and a phase's loss as one module whose forward() returns the loss:
    DistributedDataParallel synchronises the gradients of what its forward() used."""

    def __init__(
        self,
        model: MultimodalClassifier,
        heads: nn.ModuleDict,
        phase: str,
        options: TrainOptions,
        solo: tuple[str, ...] = (),
    ):
        super().__init__()
        self.model, self.heads, self.phase, self.solo = model, heads, phase, solo
        self.dropout, self.aux_loss_weight = options.modality_dropout, options.aux_loss_weight
        if options.label_smoothing is None:
            raise ValueError("label smoothing unsettled: train with options.for_data_modalities(...)")
        self.smoothing = options.label_smoothing

    def forward(
        self, batch: dict, generators: Sequence[torch.Generator], share: BatchShare, step: int
    ) -> torch.Tensor:
        if self.phase == "solo":
            return unimodal_loss(self.model, self.heads, batch, share, self.smoothing, only=self.solo)
        if self.phase == "pretrain":
            return unimodal_loss(self.model, self.heads, batch, share, self.smoothing)
        if self.phase == "alternating":
            return alternating_loss(
                self.model, self.heads, batch, step, self.dropout, generators, share, self.smoothing
            )
        return fused_loss(
            self.model,
            self.heads,
            batch,
            self.dropout,
            self.aux_loss_weight,
            generators,
            share,
            label_smoothing=self.smoothing,
        )


@dataclass
class EpochRunner:
    """What every step of a phase's epochs needs."""

    engine: nn.Module  # the TrainingObjective, or its DistributedDataParallel wrapper
    world: World
    context: StepContext
    train_set: FeatureSet
    preprocessing: Preprocessing
    options: TrainOptions
    device: torch.device
    solo: tuple[str, ...] = ()  # the solo phase's modalities (its encoders train alone)
    privacy: PrivateTraining | None = None  # --dp-epsilon: Poisson batches, per-row losses, noise

    def __post_init__(self) -> None:
        self._present = self.train_set.present() > 0  # [N, M]: which samples have which modality
        self._solo_columns = [self.train_set.modalities.index(m) for m in self.solo]

    def run(
        self,
        epoch_seed: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        description: str,
    ) -> tuple[float, float]:
        """One pass over the shuffled training set: (mean training loss over all processes, seconds)."""
        started = time.perf_counter()
        batches = self._batches(epoch_seed)
        loss_sum, seen = 0.0, 0
        shown = tqdm(
            batches,
            desc=description,
            unit="batch",
            disable=not (self.options.progress and self.world.is_main),
            leave=False,
        )
        for step, batch in enumerate(shown):
            counts = tuple(self._present[batch].sum(axis=0).tolist())
            kind = BatchShare if self.privacy is None else PerSampleShare
            share = kind(len(batch), counts, self.world.size)
            # Under DP every step is taken, whatever its rows: skipping one would depend on the data.
            solo_rows = not self._solo_columns or any(counts[column] for column in self._solo_columns)
            if not solo_rows and self.privacy is None:
                # No sample of the batch has a modality the solo phase trains: nothing to learn from, and
                # no gradient to take. Every process sees the whole batch's counts, so all skip it alike.
                scheduler.step()
                continue
            my_pieces = pieces(batch, self.world.size, self.world.rank, self.options.accumulate)
            if not my_pieces and self.privacy is None:
                continue
            loss_sum += self._step(my_pieces, share, step, epoch_seed, optimizer, scheduler)
            seen += share.rows
            shown.set_postfix(loss=f"{loss_sum * self.world.size / seen:.3f}")
        total = sum_over_processes(self.world, loss_sum)
        return total / max(seen, 1), time.perf_counter() - started

    def _batches(self, epoch_seed: int) -> list[list[int]]:
        """The epoch's batches: the shuffled rows cut into --batch-size pieces, or under DP Poisson samples."""
        if self.privacy is not None:
            return self.privacy.batches(len(self.train_set))  # from a secret generator, not the seed
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(epoch_seed))
        size = self.options.batch_size
        return [order[start : start + size].tolist() for start in range(0, len(order), size)]

    def _step(
        self,
        my_pieces: list[Piece],
        share: BatchShare,
        step: int,
        epoch_seed: int,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
    ) -> float:
        """One optimizer step over this process's pieces; returns its share of the batch's summed loss."""
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for number, piece in enumerate(my_pieces):
            batch = self.train_set.collate(piece.indices, self.device, padded_like=piece.micro_batch)
            generators = row_generators(epoch_seed, piece.indices)
            if self.options.augment:
                batch = augment_batch(batch, self.preprocessing, generators, self.options.audio_noise)
            last = number == len(my_pieces) - 1
            # Gradients are exchanged once per step, after the last micro-batch.
            no_sync = getattr(self.engine, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                self.context.start(
                    piece.first_row, len(piece.micro_batch), _mask_seed(epoch_seed, step, number)
                )
                try:
                    loss = self.engine(batch, generators, share, step)
                finally:
                    self.context.stop()
                loss.backward()
            loss_sum += loss.item() * share.rows / share.processes
        if self.privacy is not None:
            self.privacy.fill_unused(optimizer, share.rows)
        optimizer.step()  # parameters left without a gradient this step (set_to_none) are not touched
        scheduler.step()
        return loss_sum


def _mask_seed(epoch_seed: int, step: int, micro_batch: int) -> int:
    """The seed of a micro-batch's dropout masks: the same in every process."""
    return (epoch_seed * 1_000_003 + step * 1024 + micro_batch) % (1 << 63)
