"""The layers whose training-mode output depends on the whole batch, made independent of how the batch is
split among processes: BatchNorm (statistics over the batch), Dropout (random masks) and encoders that draw
random numbers per row from torch's global generator (`uniform_rows`: the audio window's trailing silence).

One process with the whole batch and N processes with a shard each must compute the same thing, or a
distributed run would not repeat a single-process one:

    BatchNorm   with several processes, the batch statistics are summed over all of them (all_reduce), and so
                are the sums its gradient needs; torch's SyncBatchNorm would do it but refuses CPU tensors
    Dropout     the mask is drawn for the whole batch from a generator every process seeds alike for the step,
                and each process keeps its own rows (with one process, its rows are all of them)
    uniform_rows  drawn for the whole batch from torch's global generator, which every process seeds alike for
                the epoch and advances alike, and cut to the process's rows (ShardedUniform)

Both follow a StepContext the training loop updates before each forward pass; outside a training step
(BatchNorm re-estimation, evaluation) they behave as torch's own layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


@dataclass
class StepContext:
    """Where this process's rows sit in the batch of the current forward pass."""

    active: bool = False  # inside a training forward pass
    first_row: int = 0  # this process's first row in the batch
    rows: int = 0  # rows of the batch over all processes
    synchronise: bool = False  # several processes: BatchNorm statistics are summed over them
    seed: int = 0  # of the step's dropout masks, the same in every process
    _generators: dict = field(default_factory=dict)  # device -> generator of the masks drawn there
    _seeded: set = field(default_factory=set)  # devices whose generator has this step's seed

    def start(self, first_row: int, rows: int, seed: int) -> None:
        self.active, self.first_row, self.rows, self.seed = True, first_row, rows, seed
        self._seeded.clear()

    def stop(self) -> None:
        self.active = False

    def generator(self, device: torch.device) -> torch.Generator:
        """The step's mask generator on `device` (masks are drawn where the activations are; processes on the
        same kind of device draw the same ones)."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        if device not in self._seeded:
            self._generators[device].manual_seed(self.seed)
            self._seeded.add(device)
        return self._generators[device]


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
        generator = context.generator(x.device)
        whole = torch.rand((context.rows, *x.shape[1:]), generator=generator, device=x.device)
        keep = whole[context.first_row : context.first_row + x.shape[0]] >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class ShardedUniform:
    """A module's `uniform_rows`: uniform draws for this process's rows of a training batch, cut from draws for
    the whole batch. With one process they are the very draws torch.rand(rows) makes, so a single-process run
    draws what it drew before; with several, every process draws the whole batch's from the global generator
    (seeded alike for the epoch) and keeps its own rows, instead of each drawing its own rows' numbers from
    the same state, which gave every shard the first shard's draws."""

    def __init__(self, context: StepContext) -> None:
        self.context = context

    def __call__(self, rows: int, device: torch.device) -> torch.Tensor:
        context = self.context
        if not context.active:
            return torch.rand(rows, device=device)
        whole = torch.rand(context.rows, device=device)
        return whole[context.first_row : context.first_row + rows]


class _SyncedNormalisation(torch.autograd.Function):
    """BatchNorm's training-mode normalisation with the statistics of the whole batch across processes.

    Written as one autograd function with torch's fused kernels where they fit (the per-process statistics in
    one pass, the normalisation itself by the eval-mode batch_norm kernel): the same computation spelled as
    tensor operations took 2.5x torch's BatchNorm forward and backward on a [32, 24, 32, 32] batch (measured
    once, one thread). One all_reduce forward and one backward, each a wait for the slowest process: on two
    processes sharing two cores, the twelve waits per step of the built-in CNN cost about a fifth of the
    throughput (216-222 samples/s against 269-272 with a temporary switch, not kept, that let each process
    normalise alone, which would no longer repeat one process; measured once, 2 epochs).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        local_var, local_mean = torch.var_mean(x, dim=dims, correction=0)
        # Per process: count, count x mean and count x (variance + mean^2), summed in float64 per channel,
        # so the variance recovered as E[x^2] - mean^2 loses nothing to cancellation.
        mean64 = local_mean.double()
        moments = torch.cat(
            [mean64 * count, (local_var.double() + mean64.pow(2)) * count, mean64.new_tensor([count])]
        )
        dist.all_reduce(moments)
        channels, n = x.shape[1], float(moments[-1])
        mean64 = moments[:channels] / n
        mean = mean64.to(x.dtype)
        variance = (moments[channels : 2 * channels] / n - mean64.pow(2)).clamp(min=0).to(x.dtype)
        out = F.batch_norm(x, mean, variance, weight, bias, training=False, momentum=0.0, eps=eps)
        invstd = torch.rsqrt(variance + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n = n
        count_over_processes = x.new_tensor(n)
        ctx.mark_non_differentiable(mean, variance, count_over_processes)
        return out, mean, variance, count_over_processes

    @staticmethod
    def backward(ctx, grad_out, _mean, _variance, _n):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        sum_dy = grad_out.sum(dim=dims)
        sum_dy_x = (grad_out * x).sum(dim=dims)
        local_sum_dy_xhat = invstd * (sum_dy_x - mean * sum_dy)
        # The gradient reaches every process's inputs through the shared statistics: sums over all of them.
        totals = torch.cat([sum_dy, sum_dy_x]).double()
        dist.all_reduce(totals)
        channels = x.shape[1]
        total_dy = totals[:channels].to(x.dtype)
        total_dy_xhat = invstd * (totals[channels:].to(x.dtype) - mean * total_dy)
        scale = invstd if weight is None else weight * invstd
        # dx = scale (dy - total_dy / n - xhat total_dy_xhat / n), as k1 dy + k2 x + k3 per channel
        k2 = -scale * invstd * total_dy_xhat / ctx.n
        k3 = -scale * total_dy / ctx.n - mean * k2
        grad_x = torch.addcmul(x * k2.view(shape) + k3.view(shape), grad_out, scale.view(shape))
        grad_weight = local_sum_dy_xhat if ctx.needs_input_grad[1] else None
        grad_bias = sum_dy if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole batch across processes (StepContext).

    Same parameters and buffers as torch's BatchNorm, so state dicts move between the two unchanged.
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
        out, mean, variance, n = _SyncedNormalisation.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            self._update_running_stats(mean, variance, float(n))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor, n: float) -> None:
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * (n / max(n - 1, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def shard_layers(model: nn.Module, context: StepContext) -> None:
    """Replace, in place, every nn.Dropout by a ShardedDropout, every module's `uniform_rows` by a
    ShardedUniform and, when the context synchronises (several processes), every BatchNorm by a
    SyncedBatchNorm. State dicts are unchanged.

    Raises TypeError for other dropout layers (Dropout2d, AlphaDropout, ...): they would draw per process, and
    N processes would no longer repeat one."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.dropout._DropoutNd) and type(child) not in (
                nn.Dropout,
                ShardedDropout,
            ):
                raise TypeError(
                    f"{type(child).__name__} at {name!r} has no sharded version; use nn.Dropout, or add one to "
                    "polysense.models.training.distributed.sharded_layers"
                )
            if type(child) is nn.Dropout:
                setattr(parent, name, ShardedDropout(child.p, context))
            elif (
                context.synchronise
                and isinstance(child, nn.modules.batchnorm._BatchNorm)
                and not isinstance(child, SyncedBatchNorm)
            ):
                setattr(parent, name, SyncedBatchNorm(child, context))
    for module in model.modules():
        if hasattr(module, "uniform_rows"):
            module.uniform_rows = ShardedUniform(context)
