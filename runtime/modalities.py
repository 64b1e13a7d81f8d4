"""The modalities polysense knows, in their canonical order, and how subsets of them are named."""

from __future__ import annotations

from collections.abc import Iterable
from itertools import combinations

from polysense.errors import ConfigError

# Canonical order: embeddings are stacked, masks laid out and subset keys written in this order.
MODALITIES: tuple[str, ...] = ("image", "text", "audio")


def check_modalities(names: Iterable[str]) -> tuple[str, ...]:
    """Validate modality names and return them in canonical order."""
    names = list(names)
    unknown = [n for n in names if n not in MODALITIES]
    if unknown:
        raise ConfigError(f"unknown modality {unknown[0]!r}; choose from {', '.join(MODALITIES)}")
    if not names:
        raise ConfigError(f"no modality given; choose one or more of {', '.join(MODALITIES)}")
    return tuple(m for m in MODALITIES if m in names)


def subset_key(present: Iterable[str]) -> str:
    """'image+audio' style key for a set of present modalities, in canonical order."""
    present = set(present)
    return "+".join(m for m in MODALITIES if m in present)


def nonempty_subsets(modalities: Iterable[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of `modalities`, smallest first, each in canonical order."""
    ordered = check_modalities(modalities)
    return [s for r in range(1, len(ordered) + 1) for s in combinations(ordered, r)]
