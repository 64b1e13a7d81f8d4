"""What each phase optimises and how: AdamW over the phase's parameters (pretrained layers at their own,
lower learning rate), with a linear warm-up and a cosine decay over the phase's steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from polysense.models.model import MultimodalClassifier
from polysense.models.training.options import TrainOptions


def optimizer_and_schedule(
    model: MultimodalClassifier,
    heads: nn.ModuleDict,
    options: TrainOptions,
    phase: str,
    steps: int,
    frozen: bool,
    solo: tuple[str, ...] = (),
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over what the phase trains, and its warm-up + cosine schedule over the phase's `steps`.
    `solo`: the modalities the solo phase trains, each encoder with its own head."""
    if phase == "solo":
        trainable = [p for m in solo for p in (*model.encoders[m].parameters(), *heads[m].parameters())]
    elif phase == "pretrain":
        trainable = [*model.encoders.parameters(), *heads.parameters()]
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if (options.aux_loss_weight > 0 or options.strategy == "alternating") and not frozen:
            trainable += list(heads.parameters())
    optimizer = torch.optim.AdamW(
        parameter_groups(model, trainable, options), lr=options.lr, weight_decay=options.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps))


def _lr_lambda(total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over the first 10 % of the steps (at most 100), then cosine decay to 5 % of the peak."""
    warmup = max(1, min(total_steps // 10, 100))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def pretrained_parameters(model: MultimodalClassifier) -> list[nn.Parameter]:
    """The parameters that came pretrained (none when the model was built --from-scratch)."""
    if not model.config.pretrained:
        return []
    found = []
    for encoder in model.encoders.values():
        prefixes = getattr(encoder, "pretrained_prefixes", ())
        found += [p for name, p in encoder.named_parameters() if prefixes and name.startswith(prefixes)]
    return found


def parameter_groups(model: MultimodalClassifier, trainable: list, options: TrainOptions) -> list[dict]:
    """The pretrained layers of pretrained encoders at --pretrained-lr, everything else at --lr."""
    pretrained = {id(p) for p in pretrained_parameters(model)}
    slow = [p for p in trainable if id(p) in pretrained]
    fast = [p for p in trainable if id(p) not in pretrained]
    groups = [{"params": fast}]
    return groups + [{"params": slow, "lr": options.pretrained_lr}] if slow else groups
