"""Structured pruning: whole attention heads, feed-forward units and convolution channels removed from a trained
classifier's encoders, so the exported graphs are smaller and faster (`polysense prune`,
polysense.models.training.prune, which then fine-tunes the pruned model briefly).

The criterion is first-order Taylor importance (Molchanov et al., 2019): the gradient of the training loss
(cross-entropy of the fused prediction, summed over `PrunePlan.batches` training batches, the model in eval mode)
is accumulated in each parameter's .grad, and a group of weights that exists only for one head, unit or channel
scores |sum of weight x gradient| over the group, the first-order estimate of how much the loss changes when the
group is removed. Each family removes its lowest-scoring groups, the same share in every layer or block:

- minilm-l6 (MiniLM.prune): heads (their query/key/value rows and attention-output columns) and feed-forward
  units (intermediate rows, output columns), sliced here;
- efficientnet-lite0 (EfficientNetLite0.prune): each inverted-residual block's expanded channels (expansion
  outputs, their BatchNorm, depthwise filters, projection inputs), by torch-pruning (the `prune` extra), whose
  dependency graph finds that group through the depthwise convolution.

What each pruned encoder keeps is its `structure()`, recorded in ModelConfig.pruned, from which the family
rebuilds the smaller module (resume, evaluation, export) before the run's weights are loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from polysense.errors import ConfigError
from polysense.models.model import MultimodalClassifier

# The counts a family's prune() may take instead of the amount, by PrunePlan field.
COUNTS = ("heads", "ffn")


@dataclass(frozen=True)
class PrunePlan:
    """How much to prune, and from how much data the importance comes."""

    amount: float = (
        0.5  # share of each layer's heads and feed-forward units, or each block's channels, removed
    )
    heads: int | None = None  # minilm-l6: heads each layer keeps (instead of the amount)
    ffn: int | None = None  # minilm-l6: feed-forward units each layer keeps (instead of the amount)
    batches: int = 16  # training batches whose loss gradients score the heads, units and channels

    def __post_init__(self) -> None:
        problems = []
        if not 0 < self.amount < 1:
            problems.append(f"--amount is the share removed, in (0, 1): got {self.amount} (0.5 removes half)")
        problems += [
            f"--{name} is how many each layer keeps: at least 1, got {getattr(self, name)}"
            for name in COUNTS
            if getattr(self, name) is not None and getattr(self, name) < 1
        ]
        if self.batches < 1:
            problems.append(f"--batches must be at least 1, got {self.batches}")
        if problems:
            raise ConfigError("; ".join(problems))

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTS if getattr(self, name) is not None}


@dataclass(frozen=True)
class PruneReport:
    structures: dict[str, dict]  # modality -> what its encoder keeps now (ModelConfig.pruned)
    parameters_before: dict[str, int]  # modality -> the encoder's parameters before pruning
    parameters_after: dict[str, int]


def prunable(model: MultimodalClassifier) -> list[str]:
    """The modalities whose encoder family can be pruned (its module has prune())."""
    return [m for m, encoder in model.encoders.items() if hasattr(encoder, "prune")]


def check_prunable(model: MultimodalClassifier, plan: PrunePlan) -> list[str]:
    """The modalities to prune; a ConfigError naming the prunable families when there is none, or when a count
    of the plan applies to none of them."""
    from polysense.models.registry import ENCODERS

    modalities = prunable(model)
    if not modalities:
        families = ", ".join(f"{m} {model.config.encoder_family(m)}" for m in model.config.modalities)
        can = [
            f"{name} ({m})"
            for m, names in ENCODERS.items()
            for name, f in names.items()
            if getattr(f, "prunable", False)
        ]
        raise ConfigError(
            f"this run's encoders ({families}) cannot be pruned; families that can: {', '.join(can)} "
            "(train with one of them, e.g. --text-encoder minilm-l6)"
        )
    for name in plan.counts():
        if not any(name in _prune_parameters(model.encoders[m]) for m in modalities):
            takers = ", ".join(model.config.encoder_family(m) for m in modalities)
            raise ConfigError(
                f"--{name} applies to minilm-l6 only, and this run prunes {takers}: use --amount"
            )
    return modalities


def _prune_parameters(encoder: torch.nn.Module) -> set[str]:
    return set(inspect.signature(encoder.prune).parameters)


def accumulate_gradients(model: MultimodalClassifier, batches: Iterable[dict[str, torch.Tensor]]) -> int:
    """The training loss's gradient, summed over `batches`, into each parameter's .grad (eval mode: no dropout,
    BatchNorm's running statistics). Returns the rows seen."""
    model.eval()
    model.zero_grad(set_to_none=True)
    rows = 0
    for batch in batches:
        loss = F.cross_entropy(model(batch), batch["labels"], reduction="sum")
        loss.backward()
        rows += int(batch["labels"].shape[0])
    return rows


def prune_model(
    model: MultimodalClassifier, plan: PrunePlan, batches: Iterable[dict[str, torch.Tensor]]
) -> PruneReport:
    """Prune every prunable encoder of `model` in place by `plan`, scored on `batches` of training data; the
    model's config then records the new structures."""
    modalities = check_prunable(model, plan)
    before = {m: _parameters(model.encoders[m]) for m in modalities}
    if accumulate_gradients(model, batches) == 0:
        raise ConfigError("pruning needs training rows to score the units, and the training split is empty")
    structures = dict(model.config.pruned)
    for modality in modalities:
        encoder = model.encoders[modality]
        takes = _prune_parameters(encoder)
        structures[modality] = encoder.prune(
            plan.amount, **{k: v for k, v in plan.counts().items() if k in takes}
        )
    model.zero_grad(set_to_none=True)
    model.config = replace(model.config, pruned=structures)
    after = {m: _parameters(model.encoders[m]) for m in modalities}
    return PruneReport({m: structures[m] for m in modalities}, before, after)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
