"""Registries of encoders (per modality) and fusion heads, so new ones slot in by name.

    @register_encoder("image", "cnn")
    def cnn(embed_dim: int = 128, image_width: int = 24) -> nn.Module: ...

The contract of an encoder family:
- forward() takes its modality's training inputs (polysense.modalities.SPECS[m].batch_keys, in order) and
  returns an embedding [B, embed_dim]; the module exposes `embed_dim`;
- its factory names the model options it takes (ModelConfig.encoder_options(): embed_dim, image_width,
  vocab_size, max_positions, n_mels) and gets only those (all of them if it takes **options);
- optional: `fit_input_stats(features)`, called once with the training split's features before training;
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
- an audio family may carry `front_end`, a function (run folder, copy) -> AudioSettings of the front end it
  reads instead of log-mel frames (speech-embedding: frozen pretrained graphs copied into the run);
- what export needs per modality: text encoders expose `vocab_size`; a streaming (audio) encoder exposes
  `n_mels`, `input_mean`/`input_std`, `step(frames, state)` and `state_layout()`.
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
    return factory(**{key: value for key, value in options.items() if family_takes(modality, name, key)})


def family_takes(modality: str, name: str, option: str) -> bool:
    """Whether registered family `name` takes model option `option` (named by its factory, or **options)."""
    factory = ENCODERS.get(modality, {}).get(name)
    if factory is None:
        return False
    parameters = inspect.signature(factory).parameters
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def family_defaults(modality: str, name: str) -> dict:
    """{"epochs": ..., "pretrained_lr": ...} that a pretrained family asks for; {} for the others."""
    return dict(getattr(ENCODERS.get(modality, {}).get(name), "defaults", {}))


def family_tokenizer(name: str):
    """The pretrained tokenizer.json of text family `name`, or None when the family learns its vocabulary."""
    tokenizer_file = getattr(ENCODERS["text"].get(name), "tokenizer_file", None)
    return tokenizer_file() if tokenizer_file is not None else None


def family_front_end(name: str):
    """The audio front end family `name` brings (a function (run folder, copy) -> AudioSettings), or None for
    the log-mel frames."""
    return getattr(ENCODERS["audio"].get(name), "front_end", None)


def create_fusion(name: str, **options) -> nn.Module:
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion {name!r}; choose from {', '.join(sorted(FUSIONS))}")
    return FUSIONS[name](**options)
