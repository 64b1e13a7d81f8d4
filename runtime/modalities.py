"""The modalities polysense knows: their canonical order, how subsets are named, and one spec per modality.

The spec table (SPECS) is the one place that says how a modality flows through the system: which
preprocessor turns an input into features, what the encoder graph's inputs and dynamic axes are, how a batch of
features becomes session feeds, and how training collates a batch for the encoder. Runtime, training and export
look modalities up here instead of branching on their names, so a new modality is one entry below (plus an
encoder family in polysense.models and an example-input builder in polysense.export.components).

Preprocessors are imported lazily, so a runtime that serves only images never imports the audio or text stacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from polysense.errors import ConfigError
from polysense.limits import Limits
from polysense.optional import require

# Canonical order: embeddings are stacked, masks laid out and subset keys written in this order.
MODALITIES: tuple[str, ...] = ("image", "text", "audio")

# A preprocessor as the pipeline calls it: (input, sample rate or None) -> features.
Preprocess = Callable[..., np.ndarray]
ReadFile = Callable[[str], bytes]  # file name -> its bytes (verified, for a bundle)


def component_name(modality: str) -> str:
    """The bundle component (ONNX graph) that encodes `modality`, e.g. "audio_encoder"."""
    return f"{modality}_encoder"


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


class Codec(Protocol):
    """How one modality's data is turned into model inputs (a small class per modality below)."""

    def preprocessor(self, settings: Any, files: ReadFile, limits: Limits) -> Preprocess:
        """(settings, a reader of the files they name, what one input may cost) -> the runtime preprocessor
        (input, sample_rate) -> features."""

    def feeds(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """Features of a batch -> the encoder graph's inputs (graph_inputs order)."""

    def collate(self, rows: Sequence[np.ndarray | None]) -> tuple[np.ndarray, ...]:
        """A training batch (None = the sample lacks the modality) -> the encoder's batch keys, zeros where absent."""

    def sample_input(self, folder: Path, rng: np.random.Generator) -> str:
        """An input as a user passes it (a file where the modality comes in files), for benchmarks."""


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    dynamic_axes: dict[str, dict[int, str]]  # the encoder graph's inputs in order, each with its dynamic axes
    batch_keys: tuple[str, ...]  # training-batch entries passed to the encoder's forward(), in order
    cell_is_path: bool  # a data-manifest cell holds a file path (else the value itself, as text does)
    streaming: bool  # the encoder carries state from call to call (run by the audio engine)
    help: str  # what a user passes, e.g. for the CLI's --image
    codec: Codec

    @property
    def component(self) -> str:
        return component_name(self.name)

    @property
    def graph_inputs(self) -> tuple[str, ...]:
        """The encoder graph's inputs, in order (a streaming encoder's state tensors follow them)."""
        return tuple(self.dynamic_axes)

    def encoder_inputs(self, settings: Any) -> tuple[str, ...]:
        """The encoder graph's inputs for these preprocessing settings: a frozen text encoder's vectors
        (--text-encoder onnx:PATH) replace the token ids; else graph_inputs."""
        return VECTOR_INPUTS if self.name == "text" and settings.graphs else self.graph_inputs


# The inputs of a text component trained on a frozen encoder's vectors [N, D] (see ModalitySpec.encoder_inputs).
VECTOR_INPUTS = ("vectors",)


class ImageCodec:
    def preprocessor(self, settings: Any, files: ReadFile, limits: Limits) -> Preprocess:
        from polysense.preprocess.image import ImagePreprocessor

        preprocessor = ImagePreprocessor(settings.size, tuple(settings.mean), tuple(settings.std), limits)
        if settings.graphs:  # a frozen encoder the user brought runs on the preprocessed image
            from polysense.preprocess.frozen import FrozenEncoder, FrozenImagePreprocessor

            (graph,) = settings.graphs
            encoder = FrozenEncoder(files(graph.file), settings.size, graph.file)
            return FrozenImagePreprocessor(preprocessor, encoder)
        return lambda image, sample_rate=None: preprocessor(image)

    def feeds(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        return (np.stack(features),)

    def collate(self, rows: Sequence[np.ndarray | None]) -> tuple[np.ndarray, ...]:
        shape = next((x.shape for x in rows if x is not None), (3, 1, 1))
        return (np.stack([np.zeros(shape, np.float32) if x is None else x for x in rows]),)

    def sample_input(self, folder: Path, rng: np.random.Generator) -> str:
        cv2 = require("cv2")

        path = folder / "sample.jpg"
        cv2.imwrite(str(path), rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
        return str(path)


class TextCodec:
    def preprocessor(self, settings: Any, files: ReadFile, limits: Limits) -> Preprocess:
        from polysense.preprocess.text import TextPreprocessor, tokenizer_from_bytes

        tokenizer = tokenizer_from_bytes(files(settings.tokenizer), settings.tokenizer)
        preprocessor = TextPreprocessor(tokenizer, settings.max_length)
        if settings.graphs:  # a frozen encoder the user brought runs on the token ids
            from polysense.preprocess.frozen import FrozenTextEncoder, FrozenTextPreprocessor

            (graph,) = settings.graphs
            return FrozenTextPreprocessor(preprocessor, FrozenTextEncoder(files(graph.file), graph.file))
        return lambda text, sample_rate=None: preprocessor(text)

    def feeds(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        """Token ids -> padded ids and mask; a frozen encoder's vectors (float) -> one batch of them."""
        from polysense.preprocess.text import pad_token_ids

        if features and features[0].dtype.kind == "f":
            return (np.stack(features),)
        return pad_token_ids(features)

    def collate(self, rows: Sequence[np.ndarray | None]) -> tuple[np.ndarray, ...]:
        vectors = next((r for r in rows if r is not None and r.dtype.kind == "f"), None)
        if vectors is not None:  # a frozen encoder's vectors; the mask marks the rows that have text
            stacked = np.stack([np.zeros_like(vectors) if r is None else r for r in rows])
            return stacked, np.array([[r is not None] for r in rows], np.int64)
        ids, mask = self.feeds([np.zeros(0, np.int64) if r is None else r for r in rows])
        if ids.shape[1] == 0:  # no text in this batch: one pad column keeps the shapes valid
            ids, mask = np.zeros((len(rows), 1), np.int64), np.zeros((len(rows), 1), np.int64)
        return ids, mask

    def sample_input(self, folder: Path, rng: np.random.Generator) -> str:
        return "a calm quiet morning at the market after the rain"


class AudioCodec:
    def preprocessor(self, settings: Any, files: ReadFile, limits: Limits) -> Preprocess:
        """An AudioPreprocessor (log-mel frames), a SpeechPreprocessor (window embeddings of frozen graphs) or
        a FrozenWindowsPreprocessor (a user's graph per window): each is called (audio, sample_rate) and makes
        a stream's buffer with `frames()`."""
        if settings.front == "frozen-windows":
            from polysense.preprocess.frozen_windows import FrozenWindowsPreprocessor, WindowEncoder

            graph = settings.graph("encoder")
            encoder = WindowEncoder(files(graph.file), settings.n_fft, graph.file)
            return FrozenWindowsPreprocessor(encoder, settings.hop_length, limits, settings.sample_rate)
        if settings.front == "speech-embedding":
            from polysense.preprocess.speech import SpeechGraphs, SpeechPreprocessor

            mel, embedding = (files(settings.graph(role).file) for role in ("mel", "embedding"))
            return SpeechPreprocessor(SpeechGraphs(mel, embedding, settings.window_hop), limits)
        from polysense.preprocess.audio import AudioPreprocessor

        return AudioPreprocessor(**settings.front_end(), limits=limits)

    def feeds(self, features: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        return (np.stack(features),)  # clips of equal frame count; padding would enter the causal state

    def collate(self, rows: Sequence[np.ndarray | None]) -> tuple[np.ndarray, ...]:
        """Frames zero-padded to the longest [B, T, n_mels] and the frame mask [B, T] (1 = real frame)."""
        n_mels = next((x.shape[1] for x in rows if x is not None), 1)
        longest = max([1] + [x.shape[0] for x in rows if x is not None])
        frames = np.zeros((len(rows), longest, n_mels), np.float32)
        mask = np.zeros((len(rows), longest), np.float32)
        for i, x in enumerate(rows):
            if x is not None:
                frames[i, : x.shape[0]] = x
                mask[i, : x.shape[0]] = 1.0
        return frames, mask

    def sample_input(self, folder: Path, rng: np.random.Generator) -> str:
        soundfile = require("soundfile")

        path = folder / "sample.wav"
        samples = (rng.standard_normal(16000) * 0.1).astype(np.float32)
        soundfile.write(str(path), samples, 16000, subtype="PCM_16")
        return str(path)


# One row per modality: name, the encoder graph's inputs with their dynamic axes, the training batch keys the
# encoder's forward() takes, whether a data-manifest cell holds a path, whether the encoder streams, what a
# user passes, and the codec.
# fmt: off
SPECS: dict[str, ModalitySpec] = {spec.name: spec for spec in (
    ModalitySpec("image", {"image": {0: "batch"}}, ("image",), True, False, "image file", ImageCodec()),
    ModalitySpec("text", {"ids": {0: "batch", 1: "length"}, "mask": {0: "batch", 1: "length"}},
                 ("text_ids", "text_mask"), False, False, "text", TextCodec()),
    ModalitySpec("audio", {"frames": {0: "batch", 1: "frames"}}, ("audio", "audio_mask"), True, True,
                 "audio file (WAV, FLAC, OGG)", AudioCodec()),
)}
# fmt: on
assert tuple(SPECS) == MODALITIES  # the table and the canonical order must agree
STREAMING = tuple(m for m in MODALITIES if SPECS[m].streaming)  # modalities whose encoder carries state
