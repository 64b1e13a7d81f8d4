"""What a Pipeline and an Ensemble both offer, declared once: the `Predictor` protocol.

Code that serves, evaluates or batches predictions takes a `Predictor` and works with either. The two differ
in what `prepare` and `embed` return (one bundle's `Prepared` and `Embeddings`, or every member's), so the
protocol is generic in those two types: `Predictor[Prepared, Embeddings]` is a Pipeline,
`Predictor[EnsemblePrepared, EnsembleEmbeddings]` an Ensemble. A function that feeds a predictor's own
prepared samples or embeddings back to it keeps the pair as type variables:

    def classify(predictor: Predictor[PreparedT, EmbeddingsT], samples: list[dict]) -> list[Prediction]:
        return predictor.predict_batch(predictor.embed(samples))

Neither class inherits from it; each satisfies it structurally (tests/test_predictor.py compares them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from polysense.bundle.schema import BundleDescription
from polysense.inference.fusion import Prediction, Rows
from polysense.limits import Limits
from polysense.preprocess.audio import AudioInput
from polysense.preprocess.image import ImageInput
from polysense.preprocess.voice import PRIOR_FRAMES, AdaptiveVoice, VoiceProfile

__all__ = [
    "AnyPredictor",
    "EmbeddingsT",
    "LiveAudioStream",
    "PreparedSample",
    "PreparedT",
    "Predictor",
    "SampleEmbeddings",
]


class PreparedSample(Protocol):
    """One checked and preprocessed sample (`Prepared`, `EnsemblePrepared`)."""

    @property
    def subset(self) -> str:
        """Its modalities as a key like 'image+text'."""
        ...

    @property
    def timings(self) -> dict[str, float]:
        """Milliseconds per preprocessing stage."""
        ...


_Self = TypeVar("_Self", bound="SampleEmbeddings")


class SampleEmbeddings(Protocol):
    """Embeddings of a batch, before fusion (`Embeddings`, `EnsembleEmbeddings`)."""

    def __len__(self) -> int: ...

    @property
    def modalities(self) -> tuple[str, ...]: ...

    @property
    def mask(self) -> np.ndarray:
        """[B, M] presence, columns in the order of `modalities`."""
        ...

    @property
    def timings(self) -> dict[str, float]: ...

    def select(self: _Self, rows: Rows = None, modalities: Iterable[str] | None = None) -> _Self:
        """The given rows, with only `modalities` marked present."""
        ...


class LiveAudioStream(Protocol):
    """One live recording (`AudioStream`, `EnsembleAudioStream`): feed chunks, read predictions."""

    @property
    def finished(self) -> bool: ...

    @property
    def frames_processed(self) -> int: ...

    @property
    def model_rate(self) -> int: ...

    @property
    def embedding(self) -> np.ndarray | None: ...

    def reset(self) -> None: ...

    def accept_waveform(self, samples: np.ndarray, sample_rate: int) -> int: ...

    def input_finished(self) -> int: ...

    def set_text(self, text: str | None) -> None: ...

    def set_image(self, image: ImageInput | None) -> None: ...

    def result(self) -> Prediction: ...


PreparedT = TypeVar("PreparedT", bound=PreparedSample)
EmbeddingsT = TypeVar("EmbeddingsT", bound=SampleEmbeddings)


class Predictor(Protocol[PreparedT, EmbeddingsT]):
    """A loaded model that predicts from any subset of its modalities: `polysense.Pipeline` (one bundle) or
    `polysense.Ensemble` (several, averaged). See Pipeline for what each member does."""

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def modalities(self) -> tuple[str, ...]: ...

    @property
    def embed_dim(self) -> int: ...

    @property
    def limits(self) -> Limits:
        """What one input may cost before it is refused."""
        ...

    @property
    def description(self) -> BundleDescription:
        """The bundle's description (an ensemble's: its first member's)."""
        ...

    @property
    def precisions(self) -> dict[str, str] | list[dict[str, str]]:
        """component -> precision (an ensemble: one such dict per member)."""
        ...

    @property
    def providers(self) -> dict[str, str] | list[dict[str, str]]:
        """component -> execution provider (an ensemble: one such dict per member)."""
        ...

    def predict(
        self,
        image: ImageInput | None = None,
        text: str | None = None,
        audio: AudioInput | None = None,
        *,
        sample_rate: int | None = None,
        voice: VoiceProfile | AdaptiveVoice | None = None,
    ) -> Prediction: ...

    def predict_batch(self, samples: Sequence[dict] | Sequence[PreparedT] | EmbeddingsT) -> list[Prediction]:
        """Sample dicts, what `prepare` made of them, or what `embed` returned."""
        ...

    def prepare(self, sample: dict) -> PreparedT: ...

    def embed(self, samples: Sequence[dict] | Sequence[PreparedT]) -> EmbeddingsT:
        """Sample dicts or what `prepare` made of them -> their embeddings, before fusion."""
        ...

    def audio_stream(
        self, encode: bool = True, voice: VoiceProfile | AdaptiveVoice | None = None
    ) -> LiveAudioStream: ...

    def voice_profile(
        self, recordings: Sequence[AudioInput], sample_rate: int | None = None
    ) -> VoiceProfile: ...

    def adaptive_voice(self, prior_frames: int = PRIOR_FRAMES) -> AdaptiveVoice: ...


# A Predictor of either kind, for code that hands a predictor's prepared samples and embeddings only back to that
# same predictor and so need not know which kind it holds (the server: polysense.serving).
AnyPredictor = Predictor[Any, Any]
