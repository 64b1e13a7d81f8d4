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

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        """A batch dict: each modality's batch keys (polysense.modalities.SPECS, e.g. image [B,3,H,W];
        text_ids/text_mask [B,L]; audio [B,T,F] + audio_mask [B,T]); present [B,M]; labels [B].
        Absent entries are zeros (and masked out)."""
        indices = list(indices)
        batch: dict[str, torch.Tensor] = {}
        for modality in self.modalities:
            spec = SPECS[modality]
            arrays = spec.codec.collate([self.features[modality][i] for i in indices])
            batch.update((key, torch.from_numpy(array)) for key, array in zip(spec.batch_keys, arrays))
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

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def modality_dropout(present: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """With `probability`, replace a sample's present modalities by a random non-empty subset of them.

    Each modality is kept with probability 1/2; a draw that keeps none keeps one present modality at random.
    Trained this way the fused model learns every subset of its inputs, not only the full set.
    """
    device, present = present.device, present.cpu()
    rows = present.shape[0]
    chosen = torch.rand(rows, generator=generator) < probability
    keep = (torch.rand(present.shape, generator=generator) < 0.5).to(present.dtype) * present
    empty = keep.sum(dim=1) == 0
    # One present modality at random: argmax of random scores restricted to present entries.
    fallback_index = (torch.rand(present.shape, generator=generator) * present).argmax(dim=1)
    fallback = torch.nn.functional.one_hot(fallback_index, present.shape[1]).to(present.dtype)
    keep = torch.where(empty.unsqueeze(1), fallback, keep)
    return torch.where(chosen.unsqueeze(1), keep, present).to(device)
