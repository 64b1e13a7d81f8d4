"""Preprocessors built from a bundle's (or a training run's) settings, in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from polysense.bundle.settings import Preprocessing
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.modalities import SPECS, Preprocess


def build_preprocessors(
    settings: Preprocessing,
    modalities: Sequence[str],
    files: str | Path | Callable[[str], bytes],
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, Preprocess]:
    """modality -> preprocessor `(input, sample_rate=None) -> features`, for each of `modalities`.

    `files` gives the files the settings name (a tokenizer.json): the folder that holds them (a training run)
    or a reader of verified bytes by name (`Bundle.read`). `limits` bound what one input may cost.
    """
    if not callable(files):
        folder = Path(files)
        files = lambda name: (folder / name).read_bytes()  # noqa: E731
    return {m: SPECS[m].codec.preprocessor(settings.of(m), files, limits) for m in modalities}
