"""The processes of a training run: one, or several started by torchrun (PyTorch's DistributedDataParallel).

torchrun gives each process its RANK, WORLD_SIZE and LOCAL_RANK in the environment, on one machine or many;
polysense reads nothing else. Processes talk over gloo on CPU and NCCL on CUDA. Rank 0 alone writes the run
folder; the others read what it wrote (so --out must be visible to every machine, as a shared filesystem makes
it) and compute the same thing on their shard of every batch (polysense.models.training.distributed.sharding).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polysense.errors import ConfigError

log = logging.getLogger("polysense")
T = TypeVar("T")

# How long the other processes wait for rank 0 to prepare the data (minutes on large sets). Training
# collectives keep torch's own timeout. A process that dies on this machine is noticed by torchrun at once; a
# machine that is lost, after these timeouts.
PREPARATION_TIMEOUT = timedelta(hours=2)
_meeting_group = None  # a gloo group with PREPARATION_TIMEOUT for rank 0's messages (any device)


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank among the processes of this machine (picks the CUDA device)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run folder, logs and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_environment() -> World:
    """The World torchrun describes in the environment; one process when it does not."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as error:
        raise ConfigError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers as torchrun sets them: {error}"
        ) from None
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK {rank} and WORLD_SIZE {size} do not describe a process of the run")
    return World(rank, size, local_rank)


def join(world: World, device: torch.device) -> torch.device:
    """Join the process group (when there are several processes) and return this process's device."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {world.local_rank} of this machine has no GPU of its own: torch sees "
                f"{torch.cuda.device_count()}; start at most that many processes per machine with --device cuda"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    global _meeting_group
    _meeting_group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    if not world.is_main:
        logging.getLogger("polysense").setLevel(logging.ERROR)  # rank 0 reports for all
    return device


# Exit status of a process stopped because another process of the run failed (that one reports the cause).
PEER_FAILED_EXIT = 3
# What gloo and NCCL say when the other end of a collective is gone.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


@contextlib.contextmanager
def stop_quietly_when_a_peer_fails(world: World) -> Iterator[None]:
    """When another process of the run dies, the collectives of this one fail too: exit with
    PEER_FAILED_EXIT and one line instead of a traceback, so that the failure that matters is the one shown
    (torchrun reports the first process to fail)."""
    try:
        yield
    except RuntimeError as error:
        gone = isinstance(error, dist.DistError) or any(marker in str(error) for marker in _PEER_GONE)
        if not (world.distributed and gone):
            raise
        cause = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        print(
            f"process {world.rank} of {world.size}: stopped, another process of the run failed ({cause})",
            file=sys.stderr,
        )
        raise SystemExit(PEER_FAILED_EXIT) from None


def leave() -> None:
    global _meeting_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _meeting_group = None


def meet(world: World) -> None:
    """Wait until every process gets here (for as long as rank 0 may take: PREPARATION_TIMEOUT)."""
    if world.distributed:
        dist.barrier(group=_meeting_group)


def from_main(world: World, value: T) -> T:
    """Rank 0's `value`, in every process (any picklable object; the others pass a placeholder). They wait for
    it as long as PREPARATION_TIMEOUT."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_meeting_group)
    return box[0]


def sum_over_processes(world: World, value: float) -> float:
    if not world.distributed:
        return value
    # NCCL reduces CUDA tensors only.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())


def replicate(module: nn.Module, world: World, device: torch.device, may_leave_unused: bool) -> nn.Module:
    """`module` itself with one process; wrapped in DistributedDataParallel with several.

    may_leave_unused: a step may leave parameters unused (a modality absent from a batch, the encoders on the
    fusion's turn of --strategy alternating), which DDP must then look for after each forward pass. Buffers are
    not synchronised: the only ones, BatchNorm's running statistics, are computed alike by every process
    (SyncedBatchNorm, then re-estimated on the same batches).
    """
    if not world.distributed:
        return module
    # torch 2.13 renamed broadcast_buffers (and deprecated the old name); older versions know only that one.
    known = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {
        "forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers": False
    }
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=may_leave_unused,
        **no_buffer_sync,
    )
