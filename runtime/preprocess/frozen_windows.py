"""An audio encoder a user brings as an ONNX graph (`--audio-encoder onnx:PATH`): one vector per window of
samples, slid over the recording, the front end of the audio modality.

The contract (docs/training.md, "Bring your own encoder"): one float32 input [N, W], N windows of W samples
at 16 kHz, mono, in [-1, 1] (what polysense's audio decoding gives); its first output is one vector per
window [N, D] or a sequence [N, T, D], averaged over T. W is the graph's own input length when it is fixed,
else one second (16,000 samples). A window starts every W / 2 samples.

Windows are laid out as the speech-embedding front end lays them (polysense.preprocess.speech): silence
before the recording, so the first window ends one hop into it; a recording of n samples gives n // hop
windows while it streams and one more over its zero-padded tail when it ends (flush), so no sample is lost.
Each window's vector depends on its own samples alone, so a stream computes each once, in any chunking, and
gets exactly what a whole recording gives. What trains is the pooled head over these vectors
(polysense.models.encoders.frozen_onnx), streamed by the audio engine with its pooled statistics as state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polysense.errors import BundleError, InputError
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.preprocess.audio import AudioInput, load_audio, resample
from polysense.preprocess.frozen import frozen_session

SAMPLE_RATE = 16_000
DEFAULT_WINDOW = SAMPLE_RATE  # samples per window when the graph leaves its length open
_BATCH = 16  # windows per graph call (bounds its memory on long recordings)


class WindowEncoder:
    """A user's audio graph on the CPU: windows of samples [k, W] -> vectors [k, D]."""

    def __init__(self, graph: bytes, window: int | None, name: str = "the frozen audio encoder") -> None:
        self._session: Any = frozen_session(graph, name)
        (first, *others) = self._session.get_inputs()
        if others or len(first.shape) != 2 or first.type != "tensor(float)":
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in self._session.get_inputs())
            raise BundleError(f"{name} must take one float32 input [batch, samples]; it takes {found}")
        fixed = first.shape[1] if isinstance(first.shape[1], int) and first.shape[1] > 0 else None
        if window is not None and fixed is not None and window != fixed:
            raise BundleError(f"{name} takes windows of {fixed} samples, not {window}")
        self.window = window or fixed or DEFAULT_WINDOW
        if self.window < 16:
            raise BundleError(f"{name} takes windows of {self.window} samples; a window needs 16 or more")
        self._input = first.name
        # A graph exported with a fixed batch of one takes one window a call.
        self._batch = 1 if first.shape[0] == 1 else _BATCH
        # The silence before every recording gives the same windows again and again: computed once.
        self._silence = self._run(np.zeros((1, self.window), np.float32))[0]
        self.width = int(self._silence.shape[0])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (result,) = self._session.run(None, {self._input: batch.astype(np.float32, copy=False)})[:1]
        return result.reshape(len(batch), -1, result.shape[-1]).mean(axis=1).astype(np.float32)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        out = np.empty((len(windows), self.width), np.float32)
        for first in range(0, len(windows), self._batch):
            batch = windows[first : first + self._batch]
            out[first : first + len(batch)] = self._run(batch) if batch.any() else self._silence
        return out


class WindowFrames:
    """One stream's samples -> window vectors, each window once (the FrameSource of this front end)."""

    def __init__(self, encoder: WindowEncoder, hop: int) -> None:
        self.encoder = encoder
        self.hop = hop
        self.width = encoder.width  # values per output frame
        self.reset()

    def reset(self) -> None:
        # Silence before the recording, so that the first window ends one hop into it.
        self.pending = np.zeros(self.encoder.window - self.hop, np.float32)  # from the next window's start
        self.total_samples = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append samples; return the vectors [k, D] of the windows now complete (k may be 0)."""
        self.total_samples += samples.size
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        window, hop = self.encoder.window, self.hop
        count = 0 if self.pending.size < window else 1 + (self.pending.size - window) // hop
        out = np.zeros((count, self.width), np.float32)
        for first in range(0, count, _BATCH):  # in blocks: a long recording never holds all its windows
            block = range(first, min(first + _BATCH, count))
            out[first : first + len(block)] = self.encoder(
                np.stack([self.pending[i * hop : i * hop + window] for i in block])
            )
        self.pending = self.pending[count * hop :].copy()
        return out

    def flush(self) -> np.ndarray:
        """The end of the recording: its tail zero-padded to one more window, unless it ended on a window."""
        left = self.total_samples % self.hop
        if self.total_samples == 0 or left == 0:
            return np.zeros((0, self.width), np.float32)
        return self.push(np.zeros(self.hop - left, np.float32))


@dataclass(frozen=True)
class FrozenWindowsPreprocessor:
    """Any audio input -> mono at `sample_rate` -> window vectors [N, D] of the user's graph."""

    encoder: WindowEncoder
    hop: int
    limits: Limits = field(default=DEFAULT_LIMITS, compare=False)
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if not 0 < self.hop <= self.encoder.window:
            raise BundleError(f"the window hop must be 1 to {self.encoder.window} samples, got {self.hop}")

    def waveform(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        samples, rate = load_audio(audio, sample_rate, self.limits)
        return resample(samples, rate, self.sample_rate)

    def frames(self) -> WindowFrames:
        return WindowFrames(self.encoder, self.hop)

    def __call__(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        frames = self.frames()
        waveform = self.waveform(audio, sample_rate)
        windows = np.concatenate([frames.push(waveform), frames.flush()])
        if windows.shape[0] == 0:
            raise InputError(
                f"audio too short: nothing is left after resampling to {self.sample_rate} Hz; "
                "pass a longer recording"
            )
        return windows
