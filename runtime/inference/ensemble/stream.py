"""A live recording through every member of an Ensemble (`Ensemble.audio_stream`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from polysense.inference.ensemble.results import combine_predictions
from polysense.inference.fusion import Prediction
from polysense.inference.pipeline import Pipeline
from polysense.preprocess.image import ImageInput
from polysense.preprocess.voice import AdaptiveVoice, VoiceProfile


class EnsembleAudioStream:
    """One live recording through every member's audio stream (see polysense.inference.streaming.AudioStream)."""

    def __init__(
        self,
        members: Sequence[Pipeline],
        labels: Sequence[str],
        encode: bool = True,
        voice: VoiceProfile | AdaptiveVoice | None = None,
    ) -> None:
        self._labels = tuple(labels)  # the order the ensemble's predictions give them in
        # The first member's stream holds an adaptive voice (it hears the recording once, when it finishes);
        # the others take the profile it lends that stream, renewed at every reset.
        self.voice = voice
        self.streams = [member.audio_stream(encode, voice) for member in members[:1]]
        lent = voice.profile if isinstance(voice, AdaptiveVoice) else voice
        self.streams += [member.audio_stream(encode, lent) for member in members[1:]]

    @property
    def finished(self) -> bool:
        return self.streams[0].finished

    @property
    def frames_processed(self) -> int:
        return self.streams[0].frames_processed

    @property
    def model_rate(self) -> int:
        """The first member's model sample rate (each member's stream resamples to its own)."""
        return self.streams[0].model_rate

    @property
    def embedding(self) -> np.ndarray | None:
        """The members' audio embeddings so far, stacked ([members, embed_dim]); None before every member
        has encoded a frame."""
        embeddings = [stream.embedding for stream in self.streams]
        present = [e for e in embeddings if e is not None]
        return np.stack(present) if len(present) == len(embeddings) else None

    def reset(self) -> None:
        """Forget the audio in every member's stream (see AudioStream.reset)."""
        if isinstance(self.voice, AdaptiveVoice):
            # What the first stream takes as it resets: learnt up to the recording that just finished.
            lent = self.voice.profile
            for stream in self.streams[1:]:
                stream.voice = lent
        for stream in self.streams:
            stream.reset()

    def accept_waveform(self, samples: np.ndarray, sample_rate: int) -> int:
        """Add a chunk to every member's stream (see AudioStream.accept_waveform); the most new frames of any
        member (members with other front ends may make different counts: any pending frame needs encoding)."""
        counts = [self.streams[0].accept_waveform(samples, sample_rate)]  # a rejected chunk stops here
        counts += [stream.accept_waveform(samples, sample_rate) for stream in self.streams[1:]]
        return max(counts)

    def input_finished(self) -> int:
        return max(stream.input_finished() for stream in self.streams)

    def set_text(self, text: str | None) -> None:
        for stream in self.streams:
            stream.set_text(text)

    def set_image(self, image: ImageInput | None) -> None:
        for stream in self.streams:
            stream.set_image(image)

    def result(self) -> Prediction:
        """The members' mean prediction from everything so far."""
        start = time.perf_counter()
        predictions = [stream.result() for stream in self.streams]
        return combine_predictions(predictions, self._labels, (time.perf_counter() - start) * 1000)
