"""How one optimizer step's batch is split into micro-batches (--accumulate) and among processes.

Every process draws the same shuffled order of the training set for an epoch (the epoch's seed), cuts it into
batches of --batch-size samples, each batch into `accumulate` micro-batches, and each micro-batch into one
contiguous shard per process. So --batch-size and --lr mean the same whatever the number of processes, and a
sample's place in the run does not depend on it either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polysense.errors import ConfigError


@dataclass(frozen=True)
class Piece:
    """This process's rows of one micro-batch."""

    indices: list[int]  # training-set indices of this process's rows
    micro_batch: list[int]  # the whole micro-batch over all processes (its padding and dropout masks)
    first_row: int  # where this process's rows start in the micro-batch


def pieces(batch: Sequence[int], processes: int, rank: int, accumulate: int) -> list[Piece]:
    """This process's pieces of one batch, one per micro-batch.

    Every process needs at least one row of every micro-batch, so a batch with fewer than processes x accumulate
    rows (only ever the last of an epoch) has fewer micro-batches, and one with fewer rows than processes is
    skipped: [] for every process.
    """
    count = min(accumulate, len(batch) // processes)
    found = []
    for micro_batch in np.array_split(np.asarray(batch, dtype=np.int64), count) if count else []:
        shards = np.array_split(np.arange(len(micro_batch)), processes)
        mine = shards[rank]
        found.append(Piece(micro_batch[mine].tolist(), micro_batch.tolist(), int(mine[0])))
    return found


def check_split(batch_size: int, processes: int, accumulate: int) -> None:
    """Refuse a batch that cannot give every process a row of every micro-batch."""
    if accumulate < 1:
        raise ConfigError(f"--accumulate must be at least 1, got {accumulate}")
    if batch_size < processes * accumulate:
        raise ConfigError(
            f"--batch-size {batch_size} cannot be split into {accumulate} micro-batch(es) for each of "
            f"{processes} process(es); use --batch-size {processes * accumulate} or more, or fewer processes"
        )
