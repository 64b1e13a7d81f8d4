"""The two layers whose training-mode output depends on the whole batch, made independent of how the batch is
split among processes: BatchNorm (statistics over the batch) and Dropout (random masks).

One process with the whole batch and N processes with a shard each must compute the same thing, or a
distributed run would not repeat a single-process one:

    BatchNorm   with several processes, the batch statistics are summed over all of them (all_reduce, which
                also carries the gradient back); torch's SyncBatchNorm would do it but refuses CPU tensors
    Dropout     the mask is drawn for the whole batch from a generator every process seeds alike for the step,
                and each process keeps its own rows (with one process, its rows are all of them)

Both follow a StepContext the training loop updates before each forward pass; outside a training step
(BatchNorm re-estimation, evaluation) they behave as torch's own layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class StepContext:
    """Where this process's rows sit in the batch of the current forward pass."""

    active: bool = False  # inside a training forward pass
    first_row: int = 0  # this process's first row in the batch
    rows: int = 0  # rows of the batch over all processes
    synchronise: bool = False  # several processes: BatchNorm statistics are summed over them
    generator: torch.Generator = field(default_factory=torch.Generator)  # the step's dropout masks

    def start(self, first_row: int, rows: int, seed: int) -> None:
        self.active, self.first_row, self.rows = True, first_row, rows
        self.generator.manual_seed(seed)

    def stop(self) -> None:
        self.active = False


class ShardedDropout(nn.Dropout):
    """nn.Dropout whose training mask is drawn for the whole batch (StepContext) and cut to this process's
    rows. Same state (none) and same eval behaviour as nn.Dropout."""

    def __init__(self, p: float, context: StepContext) -> None:
        super().__init__(p)
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context
        if not self.training or self.p == 0 or not context.active:
            return super().forward(x)
        whole = torch.rand((context.rows, *x.shape[1:]), generator=context.generator)
        keep = whole[context.first_row : context.first_row + x.shape[0]] >= self.p
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - self.p)


class _SumOverProcesses(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the gradient of a sum shared by all processes is the sum of every
    process's gradient with respect to it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:
        total = gradient.clone()
        dist.all_reduce(total)
        return total


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _SumOverProcesses.apply(tensor)


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole batch across processes (StepContext).

    Same parameters and buffers as torch's BatchNorm, so state dicts move between the two unchanged. The
    statistics are computed in two passes (mean, then mean squared deviation), each summed over processes.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, context: StepContext) -> None:
        super().__init__(norm.num_features, norm.eps, norm.momentum, norm.affine, norm.track_running_stats)
        self.load_state_dict(norm.state_dict())
        self.to(norm.running_mean.device if norm.running_mean is not None else "cpu")
        self.context = context

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a batch of at least 2 dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.context.active and self.context.synchronise):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        count = x.new_tensor(float(x.numel() // x.shape[1]))
        total = all_reduce(torch.cat([x.sum(dim=dims), count[None]]))
        n = total[-1].detach()
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        variance = all_reduce(centred.pow(2).sum(dim=dims)) / n
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), float(n))
        out = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor, n: float) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * (n / max(n - 1, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def shard_layers(model: nn.Module, context: StepContext) -> None:
    """Replace, in place, every nn.Dropout by a ShardedDropout and, when the context synchronises (several
    processes), every BatchNorm by a SyncedBatchNorm. State dicts are unchanged."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, ShardedDropout(child.p, context))
            elif (
                context.synchronise
                and isinstance(child, nn.modules.batchnorm._BatchNorm)
                and not isinstance(child, SyncedBatchNorm)
            ):
                setattr(parent, name, SyncedBatchNorm(child, context))


def synchronising() -> bool:
    """Whether this process is one of several (a process group with more than one member)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
