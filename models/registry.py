"""Registries of encoders (per modality) and fusion heads, so new ones slot in by name.

    @register_encoder("image", "cnn")
    def cnn(embed_dim: int = 128, image_width: int = 24) -> nn.Module: ...

The contract of an encoder family:
- forward() takes its modality's training inputs (polysense.modalities.SPECS[m].batch_keys, in order) and
  returns an embedding [B, embed_dim]; the module exposes `embed_dim`;
- its factory names the model options it takes (ModelConfig.encoder_options(): embed_dim, image_width,
  vocab_size, max_positions, n_mels) and gets only those (all of them if it takes **options);
- optional: `fit_input_stats(features)`, called once with the training split's features before training
  (not under --dp-epsilon: the statistics would leave the accounting); `fit_input_width(width)`, called in
  every run with the width of its input vectors (a frozen graph's: sizes the first layer);
  `int8_method = "static"` to have export calibrate static QDQ int8 (dense convolutions) instead of dynamic;
  `int8_export`, a context manager entered while export writes the graph dynamic int8 quantizes, where that
  graph may differ from the fp32 one (MiniLM: onnxruntime's fused attention);
  `channels_last = True` to train with its weights and image inputs in channels-last layout (faster CPU
  convolution kernels; the small CNN stays in the default layout, where its gain is small and its gradients
  with one thread and two differ 10x more in the last bits, enough to fail the distributed tests);
- a factory may carry `defaults`, what the family asks of training when the user leaves it to it: "epochs" and
  "pretrained_lr" (pretrained families; optionally "keep": "last"), "image_size", "image_mean", "image_std"
  (image families);
- pretrained families: the factory takes `pretrained` (load the weights; False trains from random weights),
  the module lists `pretrained_prefixes` (its parameters that came pretrained, fine-tuned at --pretrained-lr),
  and a text family's factory carries `tokenizer_file()` (its vocabulary, copied into the run instead of
  learning one);
- a family may carry `front_end`, a function (run folder, copy, name, *modality options) -> the settings of
  the front end it reads instead of the modality's own features (speech-embedding: frozen pretrained graphs
  copied into the run; onnx:PATH, any modality: the user's graph, run after the modality's preprocessing), and
  `train_speeds`, the speeds at which data preparation also computes each training recording's features;
- a family may carry `prunable = True` (polysense prune): its factory then takes `pruned` (the structure a
  pruned run keeps, from ModelConfig.pruned) and the module has `structure()` and `prune(amount)`;
- a module may set `graph_inputs` (names -> dynamic axes) where its exported graph takes other inputs than its
  modality's (a frozen text encoder's projection takes `vectors`);
- what export needs per modality: text encoders expose `vocab_size`; a streaming (audio) encoder exposes
  `n_mels`, `input_mean`/`input_std`, `step(frames, state)` and `state_layout()`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from torch import nn

from polysense.errors import ConfigError
from polysense.modalities import MODALITIES

ENCODERS: dict[str, dict[str, Callable[..., nn.Module]]] = {m: {} for m in MODALITIES}
FUSIONS: dict[str, Callable[..., nn.Module]] = {}
# `--image-encoder onnx:PATH`: a frozen ONNX encoder the user brings, per modality that takes one
# (polysense.models.encoders.frozen_onnx); its factory stands for every such name.
FROZEN_PREFIX = "onnx:"
FROZEN: dict[str, Callable[..., nn.Module]] = {}


class FamilyNames(tuple):
    """A modality's registered family names, which also holds `onnx:PATH` where the modality takes a frozen
    ONNX encoder (what TrainOptions and the CLI check a family name against)."""

    modality: str = ""

    def __new__(cls, modality: str, names: tuple[str, ...]) -> FamilyNames:
        made = super().__new__(cls, (*names, *([f"{FROZEN_PREFIX}PATH"] if modality in FROZEN else [])))
        made.modality = modality
        return made

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name.startswith(FROZEN_PREFIX):
            return self.modality in FROZEN and len(name) > len(FROZEN_PREFIX)
        return tuple.__contains__(self, name)


def is_frozen(name: str) -> bool:
    return name.startswith(FROZEN_PREFIX)


def frozen_source(name: str) -> Path:
    """The file an `onnx:PATH` family name names."""
    return Path(name[len(FROZEN_PREFIX) :]).expanduser()


def _factory(modality: str, name: str) -> Callable[..., nn.Module] | None:
    if is_frozen(name):
        return FROZEN.get(modality)
    return ENCODERS.get(modality, {}).get(name)


def register_frozen(modality: str) -> Callable:
    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        FROZEN[modality] = factory
        return factory

    return decorator


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
    factory = _factory(modality, name)
    if factory is None:
        choices = ", ".join(FamilyNames(modality, tuple(sorted(ENCODERS[modality]))))
        raise ConfigError(f"unknown {modality} encoder {name!r}; choose from {choices}")
    return factory(**{key: value for key, value in options.items() if family_takes(modality, name, key)})


def family_takes(modality: str, name: str, option: str) -> bool:
    """Whether registered family `name` takes model option `option` (named by its factory, or **options)."""
    factory = _factory(modality, name)
    if factory is None:
        return False
    parameters = inspect.signature(factory).parameters
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def family_defaults(modality: str, name: str) -> dict:
    """{"epochs": ..., "pretrained_lr": ...} that a pretrained family asks for; {} for the others."""
    return dict(getattr(_factory(modality, name), "defaults", {}))


def family_tokenizer(name: str):
    """The pretrained tokenizer.json of text family `name`, or None when the family learns its vocabulary."""
    tokenizer_file = getattr(ENCODERS["text"].get(name), "tokenizer_file", None)
    return tokenizer_file() if tokenizer_file is not None else None


def family_front_end(modality: str, name: str):
    """The front end family `name` of `modality` brings (a function (run folder, copy, name) -> its settings:
    frozen graphs copied into the run), or None for the modality's own preprocessing."""
    return getattr(_factory(modality, name), "front_end", None)


def family_train_speeds(name: str) -> tuple[float, ...]:
    """The speeds at which audio family `name` also hears each training recording (speed perturbation, done
    once while preparing the data); () for none."""
    return tuple(getattr(ENCODERS["audio"].get(name), "train_speeds", ()))


def create_fusion(name: str, **options) -> nn.Module:
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion {name!r}; choose from {', '.join(sorted(FUSIONS))}")
    return FUSIONS[name](**options)
