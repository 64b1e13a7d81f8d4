"""Evaluate a classifier on a feature set: overall metrics and metrics for every subset of modalities."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from polysense.modalities import nonempty_subsets, subset_key
from polysense.models.model import MultimodalClassifier
from polysense.models.training.dataset import FeatureSet
from polysense.tools.metrics import classification_metrics


@torch.no_grad()
def evaluate(model: MultimodalClassifier, data: FeatureSet, batch_size: int, device: torch.device) -> dict:
    """Metrics with each sample's modalities all present, plus `subsets`: each sample is evaluated on every
    non-empty subset of the modalities it has, keyed like "image+audio". Also the mean cross-entropy `loss`."""
    model.eval()
    modalities = model.config.modalities
    subsets = nonempty_subsets(modalities)
    selectors = {
        s: torch.tensor([m in s for m in modalities], dtype=torch.float32, device=device) for s in subsets
    }
    predictions: dict[tuple[str, ...] | None, list[np.ndarray]] = {s: [] for s in [None, *subsets]}
    targets: dict[tuple[str, ...] | None, list[np.ndarray]] = {s: [] for s in [None, *subsets]}
    loss_sum = 0.0
    for batch in data.batches(batch_size, device):
        embeddings = model.embed(batch)  # encoders run once; only the fusion is repeated per subset
        present, labels = batch["present"], batch["labels"]
        logits = model.fusion(embeddings, present)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        predictions[None].append(logits.argmax(1).cpu().numpy())
        targets[None].append(labels.cpu().numpy())
        for subset, selector in selectors.items():
            has_all = (present * selector).sum(1) == selector.sum()
            if has_all.any():
                subset_logits = model.fusion(embeddings[has_all], selector.expand(int(has_all.sum()), -1))
                predictions[subset].append(subset_logits.argmax(1).cpu().numpy())
                targets[subset].append(labels[has_all].cpu().numpy())
    num_classes = model.config.num_classes
    metrics = classification_metrics(
        np.concatenate(targets[None]), np.concatenate(predictions[None]), num_classes
    )
    metrics["loss"] = loss_sum / max(len(data), 1)
    metrics["subsets"] = {
        subset_key(s): classification_metrics(
            np.concatenate(targets[s]), np.concatenate(predictions[s]), num_classes
        )
        for s in subsets
        if targets[s]
    }
    return metrics


@torch.no_grad()
def evaluate_heads(
    model: MultimodalClassifier,
    heads: torch.nn.ModuleDict,
    data: FeatureSet,
    modalities: tuple[str, ...],
    batch_size: int,
    device: torch.device,
) -> dict:
    """Each encoder of `modalities` through its own linear head, on the samples that have its modality: what
    the phases that train encoders alone (solo, staged pre-training) improve, before any fusion is trained.
    {"accuracy": mean over the modalities, "loss": likewise, "by_modality": {modality: accuracy}}."""
    model.eval()
    heads.eval()
    correct = {m: 0 for m in modalities}
    loss_sum = {m: 0.0 for m in modalities}
    count = {m: 0 for m in modalities}
    for batch in data.batches(batch_size, device):
        for index, modality in enumerate(model.config.modalities):
            has = batch["present"][:, index] > 0
            if modality not in modalities or not has.any():
                continue
            logits = heads[modality](model.encode(modality, batch))[has]
            labels = batch["labels"][has]
            correct[modality] += int((logits.argmax(1) == labels).sum())
            loss_sum[modality] += float(F.cross_entropy(logits, labels, reduction="sum"))
            count[modality] += int(has.sum())
    measured = [m for m in modalities if count[m]]
    by_modality = {m: correct[m] / count[m] for m in measured}
    return {
        "accuracy": sum(by_modality.values()) / max(len(measured), 1),
        "loss": sum(loss_sum[m] / count[m] for m in measured) / max(len(measured), 1),
        "by_modality": by_modality,
    }
