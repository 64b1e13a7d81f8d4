"""BatchNorm re-estimation ("precise BN") after each epoch of training."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from polysense.models.model import MultimodalClassifier
from polysense.models.training.dataset import FeatureSet


@torch.no_grad()
def recalibrate_batchnorm(
    model: MultimodalClassifier,
    data: FeatureSet,
    batch_size: int,
    device: torch.device,
    *,
    max_batches: int = 16,
    modalities: Collection[str] | None = None,
) -> None:
    """Re-estimate every BatchNorm's running statistics for the current weights (of the encoders of
    `modalities` only, when given: the others did not change).

    AdamW moves the weights so fast that the running averages trail them: measured on the built-in set,
    validation accuracy in eval mode swung between 0.34 and 0.85 while the same weights with batch statistics
    scored 0.99. Averaging exact statistics over a fixed, seeded sample of training batches removes the lag.
    """
    modalities = model.config.modalities if modalities is None else tuple(modalities)
    encoders = [model.encoders[m] for m in modalities]
    norms = [n for e in encoders for n in e.modules() if isinstance(n, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
        norm.train()
    generator = torch.Generator().manual_seed(0)
    for number, batch in enumerate(data.batches(batch_size, device, generator)):
        if number == max_batches:
            break
        for index, modality in enumerate(model.config.modalities):  # BatchNorm lives in the encoders
            if modality in modalities and batch["present"][:, index].any():
                model.encode(modality, batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.train(was_training)
