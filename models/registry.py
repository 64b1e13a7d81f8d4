"""Registries of encoders (per modality) and fusion heads, so new ones slot in by name.

    @register_encoder("image", "cnn")
    def cnn(embed_dim: int = 128, **options) -> nn.Module: ...

Every encoder's forward() takes its modality's training inputs (polysense.modalities.SPECS[m].batch_keys, in
order) and returns an embedding [B, embed_dim]; it exposes `embed_dim`. A family's factory names the options it
takes; create_encoder passes it only those, so one set of model options serves every family.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from polysense.errors import ConfigError
from polysense.modalities import MODALITIES

ENCODERS: dict[str, dict[str, Callable[..., nn.Module]]] = {m: {} for m in MODALITIES}
FUSIONS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(modality: str, name: str) -> Callable:
    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ENCODERS[modality][name] = factory
        return factory

    return decorator


def register_fusion(name: str) -> Callable:
    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        FUSIONS[name] = factory
        return factory

    return decorator


def create_encoder(modality: str, name: str, **options) -> nn.Module:
    if modality not in ENCODERS:
        raise ConfigError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
    if name not in ENCODERS[modality]:
        choices = ", ".join(sorted(ENCODERS[modality]))
        raise ConfigError(f"unknown {modality} encoder {name!r}; choose from {choices}")
    factory = ENCODERS[modality][name]
    accepted = inspect.signature(factory).parameters
    return factory(**{key: value for key, value in options.items() if key in accepted})


def create_fusion(name: str, **options) -> nn.Module:
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion {name!r}; choose from {', '.join(sorted(FUSIONS))}")
    return FUSIONS[name](**options)
