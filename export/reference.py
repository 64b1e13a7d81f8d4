"""The torch model run on the runtime's features: the reference the runtime is checked (and benchmarked) against."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from polysense.modalities import SPECS
from polysense.models.model import MultimodalClassifier


def torch_inputs(modality: str, features: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The encoder's inputs for a batch of the runtime's preprocessed features (as the sessions get them)."""
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in SPECS[modality].codec.feeds(features))


@torch.no_grad()
def torch_logits(model: MultimodalClassifier, features: Mapping[str, np.ndarray]) -> torch.Tensor:
    """Logits [1, C] for one sample's preprocessed features; a modality missing from `features` is absent."""
    embeddings, mask = [], []
    for modality in model.config.modalities:
        if modality not in features:
            embeddings.append(torch.zeros(1, model.config.embed_dim))
            mask.append(0.0)
            continue
        embeddings.append(model.encoders[modality](*torch_inputs(modality, [features[modality]])))
        mask.append(1.0)
    return model.fusion(torch.stack(embeddings, dim=1), torch.tensor([mask]))
