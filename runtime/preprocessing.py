"""Preprocessors built from a bundle's (or a training run's) settings, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.modalities import SPECS, Preprocess
from polysense.settings import Preprocessing


def build_preprocessors(
    settings: Preprocessing, modalities: Sequence[str], folder: str | Path, limits: Limits = DEFAULT_LIMITS
) -> dict[str, Preprocess]:
    """modality -> preprocessor `(input, sample_rate=None) -> features`, for each of `modalities`.

    `folder` holds the files the settings name (the bundle's tokenizer.json, or a training run's); `limits`
    bound what one input may cost.
    """
    return {m: SPECS[m].codec.preprocessor(settings.of(m), Path(folder), limits) for m in modalities}
