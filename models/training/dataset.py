"""Preprocessed features held in memory, batching and modality dropout.

Features come from the runtime's preprocessors (one implementation for training and serving). Preprocessing
is deterministic, so it runs once per sample before training instead of once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from polysense.modalities import SPECS


@dataclass
class FeatureSet:
    """One split: features per modality (None where a sample lacks it) and integer labels."""

    modalities: tuple[str, ...]
    features: dict[str, list[np.ndarray | None]]
    labels: np.ndarray  # [N] int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def present(self) -> np.ndarray:
        """[N, M] float32, 1 where the sample has the modality."""
        return np.array(
            [[self.features[m][i] is not None for m in self.modalities] for i in range(len(self))],
            dtype=np.float32,
        )

    def collate(
        self, indices: Sequence[int], device: torch.device, padded_like: Sequence[int] = ()
    ) -> dict[str, torch.Tensor]:
        """A batch dict: each modality's batch keys (polysense.modalities.SPECS, e.g. image [B,3,H,W];
        text_ids/text_mask [B,L]; audio [B,T,F] + audio_mask [B,T]); present [B,M]; labels [B].
        Absent entries are zeros (and masked out).

        padded_like: more samples whose lengths the padding must cover too (a process's shard of a distributed
        batch is padded like the whole batch, so every shard has the shapes one process would see)."""
        indices = list(indices)
        batch: dict[str, torch.Tensor] = {}
        for modality in self.modalities:
            spec = SPECS[modality]
            arrays = spec.codec.collate([self.features[modality][i] for i in indices])
            length = self.longest(modality, padded_like)
            for key, array in zip(spec.batch_keys, arrays):
                if array.ndim > 1 and length > array.shape[1]:  # text and audio: pad the length axis with 0
                    widths = [(0, 0), (0, length - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
                    array = np.pad(array, widths)
                batch[key] = torch.from_numpy(array)
        present = [[self.features[m][i] is not None for m in self.modalities] for i in indices]
        batch["present"] = torch.tensor(present, dtype=torch.float32)
        batch["labels"] = torch.from_numpy(self.labels[indices])
        return {k: v.to(device) for k, v in batch.items()}

    def batches(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled batches when a generator is given, in order otherwise (collated lazily)."""
        order = (
            torch.randperm(len(self), generator=generator).tolist() if generator else list(range(len(self)))
        )
        for start in range(0, len(order), batch_size):
            yield self.collate(order[start : start + batch_size], device)

    def longest(self, modality: str, indices: Sequence[int]) -> int:
        """The longest of these samples' `modality` features along their first axis (0 for images, whose
        first axis is channels, for a frozen text encoder's vectors [D], and when none has it)."""
        first = next((x for x in self.features[modality] if x is not None), None)
        if modality == "image" or (first is not None and first.ndim == 1 and first.dtype.kind == "f"):
            return 0
        return max(
            (len(self.features[modality][i]) for i in indices if self.features[modality][i] is not None),
            default=0,
        )

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def row_generators(epoch_seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One generator per sample, seeded from (the epoch's seed, the sample's index): every random draw for a
    sample (augmentation, modality dropout) is then the same however the batch is split among processes or
    micro-batches."""
    return [torch.Generator().manual_seed(_mix(epoch_seed, index)) for index in indices]


def _mix(epoch_seed: int, index: int) -> int:
    # Two 64-bit odd multipliers (splitmix64's): neighbouring (seed, index) pairs get unrelated seeds.
    return (epoch_seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) % (1 << 63)


def modality_dropout(
    present: torch.Tensor, probability: float, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """With `probability`, replace a sample's present modalities by a random non-empty subset of them
    (`generators`: one per row, see row_generators).

    Each modality is kept with probability 1/2; a draw that keeps none keeps one present modality at random.
    Trained this way the fused model learns every subset of its inputs, not only the full set.
    """
    if present.shape[0] == 0:
        return present
    device, present = present.device, present.cpu()
    columns = present.shape[1]
    draws = torch.stack([torch.rand(1 + 2 * columns, generator=g) for g in generators])
    chosen = draws[:, 0] < probability
    keep = (draws[:, 1 : 1 + columns] < 0.5).to(present.dtype) * present
    empty = keep.sum(dim=1) == 0
    # One present modality at random: argmax of random scores restricted to present entries.
    fallback_index = (draws[:, 1 + columns :] * present).argmax(dim=1)
    fallback = torch.nn.functional.one_hot(fallback_index, present.shape[1]).to(present.dtype)
    keep = torch.where(empty.unsqueeze(1), fallback, keep)
    return torch.where(chosen.unsqueeze(1), keep, present).to(device)
