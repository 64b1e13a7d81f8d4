"""Checks on real samples: parity inputs per component, and the whole bundle against torch through the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import polysense
from polysense.bundle.schema import FUSION
from polysense.export.components import Component
from polysense.export.parity import Difference, ExportError, allowed_difference
from polysense.export.reference import torch_inputs, torch_logits
from polysense.inference.preprocessors import Preprocess
from polysense.modalities import nonempty_subsets
from polysense.models.model import MultimodalClassifier
from polysense.tools.manifest import Row

REAL_SAMPLES = 4  # test-split samples used for parity on real inputs


@dataclass
class RealSamples:
    cases: dict[str, list[tuple[torch.Tensor, ...]]]  # component -> parity inputs built from real samples
    samples: list[dict]  # raw test samples (paths, text) for the end-to-end check


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _encoder_cases(part: Component, features: list[np.ndarray]) -> list[tuple[torch.Tensor, ...]]:
    """One batch of every feature; a streaming encoder gets one case per recording, from the zero state."""
    if not part.state:
        return [torch_inputs(part.modality, features)]
    zero = tuple(torch.zeros(t.shape) for t in part.state)
    return [(*torch_inputs(part.modality, [f]), *zero) for f in features]


@torch.no_grad()
def real_samples(
    test_rows: list[Row],
    model: MultimodalClassifier,
    parts: list[Component],
    preprocessors: dict[str, Preprocess],
) -> RealSamples:
    """Inputs per component from real test-split samples, and raw samples for the end-to-end check.

    Each encoder gets up to REAL_SAMPLES test rows that have its modality; the fusion head gets their
    embeddings (zeros for a modality no test row has) under every subset mask.
    """
    modalities = model.config.modalities
    cases: dict[str, list] = {}
    embeddings: dict[str, torch.Tensor] = {}
    for part in parts:
        if part.modality is None:
            continue
        values = [getattr(r, part.modality) for r in test_rows if getattr(r, part.modality) is not None]
        if not values:
            continue
        features = [preprocessors[part.modality](v) for v in values[:REAL_SAMPLES]]
        cases[part.name] = _encoder_cases(part, features)
        embeddings[part.modality] = torch.cat([_first(part.module(*case)) for case in cases[part.name]])
    count = min((len(e) for e in embeddings.values()), default=0)
    if count:
        stacked = [
            embeddings[m][:count] if m in embeddings else torch.zeros(count, model.config.embed_dim)
            for m in modalities
        ]
        cases[FUSION] = [
            (*stacked, torch.tensor([[float(m in subset) for m in modalities]] * count))
            for subset in nonempty_subsets(modalities)
        ]
    rows = test_rows[:REAL_SAMPLES]
    samples = [{m: getattr(r, m) for m in modalities if getattr(r, m) is not None} for r in rows]
    return RealSamples(cases, samples)


def check_end_to_end(
    bundle: Path, model: MultimodalClassifier, samples: list[dict], preprocessors: dict[str, Preprocess]
) -> float:
    """Load the bundle with the real runtime and compare its probabilities with torch's on real samples."""
    pipeline = polysense.Pipeline.load(bundle, device="cpu", precision="fp32")
    predictions = pipeline.predict_batch(samples)
    worst = Difference()
    for sample, prediction in zip(samples, predictions):
        features = {m: preprocessors[m](value) for m, value in sample.items()}
        expected = torch.softmax(torch_logits(model, features), dim=1)[0].numpy()
        got = np.array([prediction.probabilities[label] for label in pipeline.labels])
        worst = worst.worse(Difference(float(np.abs(expected - got).max()), allowed_difference(expected)))
    if worst.found > worst.allowed:
        raise ExportError(
            f"the runtime's probabilities differ from torch's by {worst.found:.2e} where {worst.allowed:.2e} "
            "is allowed"
        )
    return worst.found
