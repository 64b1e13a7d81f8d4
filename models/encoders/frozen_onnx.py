"""`--image-encoder onnx:PATH`, `--text-encoder onnx:PATH`, `--audio-encoder onnx:PATH`: an encoder the user
brings as an ONNX graph, used frozen.

Many users have a pretrained encoder as an ONNX file already (exported with Optimum, tf2onnx or their own
torch.onnx code). Its graph becomes the front end of its modality (polysense.preprocess.frozen and
polysense.preprocess.frozen_windows state the contracts): data preparation copies it into the run byte for
byte (a text graph with the tokenizer.json beside it), records its sha256 and where it came from, and runs it
once per input; the runtime runs the same bytes from the bundle. What trains is small: for images and texts a
projection of the graph's vectors to --embed-dim; for audio the pooled head of the speech-embedding family
over the window vectors, which streams. Export writes it as the modality's component with its parity check,
as any other.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

from polysense.bundle.settings import FROZEN_WINDOWS, AudioSettings, FrozenGraph, ImageSettings, TextSettings
from polysense.errors import ConfigError, PolysenseError
from polysense.modalities import VECTOR_INPUTS
from polysense.models.encoders.speech_embedding import PooledWindowsHead
from polysense.models.registry import frozen_source, register_frozen
from polysense.preprocess.frozen import FrozenTextEncoder
from polysense.preprocess.frozen_windows import SAMPLE_RATE, WindowEncoder
from polysense.preprocess.image import IMAGENET_MEAN, IMAGENET_STD
from polysense.preprocess.text import TextPreprocessor

GRAPH_FILE = "image_frozen.onnx"  # its name in a run folder and a bundle
TEXT_GRAPH_FILE, AUDIO_GRAPH_FILE = "text_frozen.onnx", "audio_frozen.onnx"
TOKENIZER_FILE = (
    "tokenizer.json"  # beside a text graph, as Optimum and tokenizers write it; so named in a run
)


class FrozenVectorHead(nn.Module):
    """Vectors of a frozen encoder [B, D] -> embedding [B, embed_dim]. D is read from the first batch (or
    from the weights a run saved), so a model can be rebuilt from its config without the original file."""

    def __init__(self, embed_dim: int = 128) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.project = nn.Sequential(nn.Dropout(0.1), nn.LazyLinear(embed_dim))

    @property
    def input_width(self) -> int:
        """D, the frozen encoder's vector width (what export's example input needs)."""
        return self.project[1].in_features

    def fit_input_width(self, width: int) -> None:
        """Called with the width of the graph's vectors before training: sizes the projection (the training loop
        sets its layers trainable before any batch runs)."""
        with torch.no_grad():
            self.project(torch.zeros(1, width))

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (a text batch's second key) is ignored: a sample's vector is there or zeros."""
        return self.project(vectors)


class TextVectorHead(FrozenVectorHead):
    """FrozenVectorHead for texts: its graph takes the frozen encoder's vectors instead of token ids."""

    graph_inputs = {VECTOR_INPUTS[0]: {0: "batch"}}  # export's names and dynamic axes for this component


def _copy_graph(folder: Path, copy: bool, modality: str, family: str, file: str) -> tuple[FrozenGraph, bytes]:
    """The graph `family` (onnx:PATH) names, copied into `folder` as `file` when `copy`, recorded with its sha256
    and the path it came from; and its bytes."""
    source = frozen_source(family)
    if not source.is_file():
        raise ConfigError(
            f"--{modality}-encoder {family}: {source} is not a file; give the path of an ONNX graph"
        )
    data = source.read_bytes()  # read once: the bytes hashed are the bytes copied
    if copy:
        (folder / file).write_bytes(data)
    graph = FrozenGraph("encoder", file, hashlib.sha256(data).hexdigest(), "", "", str(source.resolve()))
    return graph, data


def _broken_contract(modality: str, family: str, error: PolysenseError) -> ConfigError:
    """The user's graph fails its contract: said before any data is prepared."""
    return ConfigError(f'--{modality}-encoder {family}: {error} (docs/training.md, "Bring your own encoder")')


def frozen_image_settings(folder: Path, copy: bool, family: str, size: int) -> ImageSettings:
    """The image settings of `family` (onnx:PATH): its graph in `folder`, ImageNet's mean and std."""
    graph, _ = _copy_graph(folder, copy, "image", family, GRAPH_FILE)
    return ImageSettings(size, IMAGENET_MEAN, IMAGENET_STD, (graph,))


def frozen_text_settings(folder: Path, copy: bool, family: str, max_length: int) -> TextSettings:
    """The text settings of `family` (onnx:PATH): its graph and the tokenizer.json beside it, in `folder`."""
    tokenizer = frozen_source(family).parent / TOKENIZER_FILE
    graph, data = _copy_graph(folder, copy, "text", family, TEXT_GRAPH_FILE)
    if not tokenizer.is_file():
        raise ConfigError(
            f"--text-encoder {family}: no {TOKENIZER_FILE} beside the graph ({tokenizer}); put the tokenizer "
            "that makes its input ids there (Optimum's export folder has both)"
        )
    try:
        FrozenTextEncoder(data, str(frozen_source(family)))
        TextPreprocessor(tokenizer)
    except PolysenseError as error:
        raise _broken_contract("text", family, error) from error
    if copy:
        shutil.copyfile(tokenizer, folder / TOKENIZER_FILE)
    return TextSettings(TOKENIZER_FILE, max_length, graphs=(graph,))


def frozen_audio_settings(folder: Path, copy: bool, family: str) -> AudioSettings:
    """The audio settings of `family` (onnx:PATH): its graph in `folder`, its window (the graph's fixed input
    length, else one second), half of it between windows, and the width of its vectors."""
    graph, data = _copy_graph(folder, copy, "audio", family, AUDIO_GRAPH_FILE)
    try:
        encoder = WindowEncoder(data, None, str(frozen_source(family)))
    except PolysenseError as error:
        raise _broken_contract("audio", family, error) from error
    window, hop = encoder.window, max(encoder.window // 2, 1)
    return AudioSettings(SAMPLE_RATE, window, hop, encoder.width, front=FROZEN_WINDOWS, graphs=(graph,))


@register_frozen("image")
def frozen_image(embed_dim: int = 128) -> FrozenVectorHead:
    return FrozenVectorHead(embed_dim)


frozen_image.front_end = frozen_image_settings


@register_frozen("text")
def frozen_text(embed_dim: int = 128) -> TextVectorHead:
    return TextVectorHead(embed_dim)


frozen_text.front_end = frozen_text_settings


@register_frozen("audio")
def frozen_audio(embed_dim: int = 128, n_mels: int = 0) -> PooledWindowsHead:
    """n_mels: the width of the graph's window vectors (the run's audio settings record it)."""
    return PooledWindowsHead(embed_dim, width=n_mels)


frozen_audio.front_end = frozen_audio_settings
