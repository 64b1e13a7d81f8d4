"""Streaming: live audio chunks and video frames through the same encoder graphs as offline prediction.

Audio: samples of any rate and chunk size -> stateful resampler (libsoxr's stream, bit-exact with its
one-shot resampling) -> a small sample buffer -> the log-mel frames whose window is complete -> the causal
audio encoder on those new frames only, carrying its state tensors. `input_finished()` zero-pads the tail
exactly as offline processing does, so the final embedding equals `Pipeline.predict(audio=...)` on the whole
recording, whatever the chunking. A stream owns its buffer and state; the engine (the encoder session) is shared.

Video: frames from cv2.VideoCapture (file, camera index, URL) or pushed by the caller, sampled at a target
rate, each sampled frame through the image encoder, embeddings averaged over a sliding window.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from polysense.bundle.settings import AudioSettings
from polysense.errors import InputError
from polysense.inference.audio_engine import AudioEngine, State
from polysense.inference.fusion import Prediction
from polysense.inference.predictor import LiveAudioStream
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.optional import require
from polysense.preprocess.audio import FrameSource, array_to_mono, check_sample_rate
from polysense.preprocess.image import ImageInput
from polysense.preprocess.voice import AdaptiveVoice, VoiceProfile

# An adaptive voice hears at most this many frames of one streamed recording (30 s at the 10 ms hop): a live
# stream may never end, and a voice is learnt from seconds of speech, not minutes.
MAX_HEARD_FRAMES = 3000

# The narrow calls a stream makes besides the engine's: encode one image or text, fuse embeddings.
Embed = Callable[[str, ImageInput | str], np.ndarray]  # (modality, an image or a text) -> [D]
VideoSource = str | int | os.PathLike  # a file path or URL, or a camera index
Fuse = Callable[[Mapping[str, "np.ndarray | None"]], Prediction]


class AudioStream:
    """One live recording: feed chunks, read predictions. Create with `Pipeline.audio_stream()`."""

    def __init__(
        self,
        engine: AudioEngine,
        settings: AudioSettings,
        frames: FrameSource,
        embed: Embed,
        fuse: Fuse,
        encode: bool = True,
        limits: Limits = DEFAULT_LIMITS,
        voice: VoiceProfile | AdaptiveVoice | None = None,
    ) -> None:
        self._engine = engine
        # Removed from every frame (models trained with --voice-norm), as offline. An adaptive voice lends the
        # profile it has learnt when a recording starts and hears the recording when its input finishes.
        self.voice = voice
        self._limits = limits
        self._embed, self._fuse = embed, fuse
        self.encode_immediately = encode  # False: frames wait in `pending_frames` for encode_streams()
        self.model_rate = settings.sample_rate
        self._frames = frames  # the front end's buffer: samples in, the encoder's frames out
        self.image_embedding: np.ndarray | None = None
        self.text_embedding: np.ndarray | None = None
        self.video: VideoStream | None = None
        self.reset()

    @property
    def engine(self) -> AudioEngine:
        return self._engine

    @property
    def state(self) -> State:
        """The encoder state after every frame encoded so far (zeros before the first)."""
        return self._state

    @property
    def pending_frames(self) -> np.ndarray:
        """Frames [k, n_mels] waiting for `encode_streams` (always empty when the stream encodes at once)."""
        return self._pending

    # -- life cycle ----------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the audio (state, buffers, rate); image, text and an attached video stay."""
        self.sample_rate: int | None = None
        self._resampler: Any = None  # a soxr.ResampleStream (soxr ships no type hints)
        self._frames.reset()
        self._state = self._engine.initial_state(1)
        self.embedding: np.ndarray | None = None  # of all audio encoded so far
        self.frames_processed = 0
        self._pending = np.zeros((0, self._frames.width), np.float32)
        self.finished = False
        adaptive = isinstance(self.voice, AdaptiveVoice)
        self._profile: VoiceProfile | None = (
            self.voice.profile if isinstance(self.voice, AdaptiveVoice) else self.voice
        )
        self._heard: list[np.ndarray] | None = [] if adaptive else None  # raw frames the voice will hear
        self._heard_count = 0

    def accept_waveform(self, samples: np.ndarray, sample_rate: int) -> int:
        """Add a chunk (any length, any common rate, int16/int32/uint8/float, mono or [n, channels]).

        Returns the number of new log-mel frames (run through the encoder unless this stream defers them).
        A rejected chunk raises InputError and leaves the stream exactly as it was.
        """
        if self.finished:
            raise InputError("audio after input_finished(); call reset() to start a new recording")
        rate = check_sample_rate(sample_rate)
        self._limits.check_sample_rate(rate, "the audio stream")
        if self.sample_rate is not None and rate != self.sample_rate:
            raise InputError(
                f"sample rate changed mid-stream from {self.sample_rate} to {rate} Hz; "
                "call reset() (or use another stream) for audio at a different rate"
            )
        mono = array_to_mono(samples)  # checks dtype, rank and NaN/Inf before anything changes
        if mono.size == 0:
            return 0
        if self.sample_rate is None:
            self.sample_rate = rate
            if rate != self.model_rate:
                self._resampler = require("soxr").ResampleStream(
                    rate, self.model_rate, 1, dtype="float32", quality="HQ"
                )
        resampled = self._resampler.resample_chunk(mono, last=False) if self._resampler else mono
        return self._take(self._frames.push(resampled))

    def input_finished(self) -> int:
        """No more audio: flush the resampler and the last partial frame, so no sample is lost."""
        if self.finished:
            return 0
        tail = np.zeros(0, np.float32)
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(tail, last=True)
        frames = self._frames.push(tail) if tail.size else np.zeros((0, self._frames.width), np.float32)
        frames = np.concatenate([frames, self._frames.flush()])
        self.finished = True
        count = self._take(frames)
        if self._heard and isinstance(self.voice, AdaptiveVoice):  # only an adaptive voice collects frames
            self.voice.hear(np.concatenate(self._heard))
            self._heard = []
        return count

    def _take(self, frames: np.ndarray) -> int:
        if frames.shape[0] == 0:
            return 0
        if self._heard is not None and self._heard_count < MAX_HEARD_FRAMES:
            self._heard.append(frames[: MAX_HEARD_FRAMES - self._heard_count])
            self._heard_count += self._heard[-1].shape[0]
        if self._profile is not None:
            frames = self._profile.normalise(frames)
        self._pending = np.concatenate([self._pending, frames]) if self._pending.size else frames
        if self.encode_immediately:
            embedding, state = self._engine.run(self._pending[None], self._state)
            self.absorb(embedding[0], state)
        return frames.shape[0]

    def absorb(self, embedding: np.ndarray, state: State) -> None:
        """The engine's result for the pending frames: the embedding so far and the state after them."""
        self.embedding = embedding
        self._state = state
        self.frames_processed += self._pending.shape[0]
        self._pending = self._pending[:0]

    # -- other modalities and results ----------------------------------------------------------------------

    def set_text(self, text: str | None) -> None:
        """Text fused with the audio from now on (None removes it); encoded once here."""
        self.text_embedding = None if text is None else self._embed("text", text)

    def set_image(self, image: ImageInput | None) -> None:
        """An image fused with the audio from now on (None removes it); encoded once here."""
        self.image_embedding = None if image is None else self._embed("image", image)

    def attach_video(self, video: VideoStream | None) -> None:
        """Fuse with the video stream's current window of frames instead of a fixed image."""
        self.video = video

    def result(self) -> Prediction:
        """The prediction from everything so far: audio (if any frame yet), image or video, text."""
        image = self.video.embedding if self.video is not None else self.image_embedding
        return self._fuse({"audio": self.embedding, "image": image, "text": self.text_embedding})


def encode_streams(streams: Sequence[LiveAudioStream]) -> None:
    """Encode the pending frames of deferred streams (`pipeline.audio_stream(encode=False)`), batched per
    engine: a convenience over `AudioEngine.encode_streams` for streams of one or several pipelines, and for
    an ensemble's streams (`ensemble.audio_stream(encode=False)`: each member's stream is encoded)."""
    by_engine: dict[int, list[AudioStream]] = {}
    for stream in streams:
        for member_stream in _deferred(stream):
            by_engine.setdefault(id(member_stream.engine), []).append(member_stream)
    for group in by_engine.values():
        group[0].engine.encode_streams(group)


def _deferred(stream: LiveAudioStream) -> list[AudioStream]:
    """The AudioStreams a live stream encodes through: itself, or an EnsembleAudioStream's members."""
    if isinstance(stream, AudioStream):
        return [stream]
    members = getattr(stream, "streams", None)  # an EnsembleAudioStream (which this module cannot import)
    if not members or not all(isinstance(s, AudioStream) for s in members):
        raise InputError(
            f"encode_streams takes what audio_stream(encode=False) made, got {type(stream).__name__}"
        )
    return list(members)


class VideoStream:
    """Sampled video frames through the image encoder, averaged over a sliding window."""

    def __init__(
        self,
        embed: Embed,
        fuse: Fuse,
        source: VideoSource | None = None,
        fps: float = 5.0,
        window: int = 8,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        if not fps > 0:
            raise InputError(f"fps must be positive, got {fps}")
        if window < 1:
            raise InputError(f"window must be at least 1 frame, got {window}")
        self._embed, self._fuse = embed, fuse
        self.source, self.fps, self.window = source, float(fps), window
        self._limits = limits
        self.text_embedding: np.ndarray | None = None
        self.embeddings: deque[np.ndarray] = deque(maxlen=window)
        self.next_time = 0.0  # seconds: the next frame at or after this time is sampled
        self.frames_seen = 0
        self.frames_encoded = 0

    @property
    def embedding(self) -> np.ndarray | None:
        """Mean embedding of the last `window` sampled frames (None before the first)."""
        return np.mean(np.stack(self.embeddings), axis=0) if self.embeddings else None

    def set_text(self, text: str | None) -> None:
        """Text fused with the video from now on (None removes it); encoded once here."""
        self.text_embedding = None if text is None else self._embed("text", text)

    def result(self) -> Prediction:
        """The prediction from the current window of frames (and the text, if set)."""
        return self._fuse({"image": self.embedding, "text": self.text_embedding})

    def push(self, frame: np.ndarray, timestamp: float) -> bool:
        """Offer an RGB uint8 frame taken at `timestamp` seconds; True if it was sampled and encoded."""
        self.frames_seen += 1
        if timestamp + 1e-9 < self.next_time:
            return False
        self.embeddings.append(self._embed("image", frame))
        self.frames_encoded += 1
        # Sample on a fixed grid (1/fps apart) so a jittery camera clock does not drift the rate.
        self.next_time = max(self.next_time + 1.0 / self.fps, timestamp - 0.5 / self.fps)
        return True

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        """(timestamp in s, RGB frame) from the source: a file path, camera index or URL."""
        cv2 = require("cv2")

        if self.source is None:
            raise InputError("this video stream has no source; push frames with push(frame, timestamp)")
        capture = cv2.VideoCapture(self.source if isinstance(self.source, int) else str(self.source))
        if not capture.isOpened():
            raise InputError(f"cannot open video source {self.source!r} (missing file, camera or codec?)")
        width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
        if width * height > self._limits.max_image_pixels:  # each frame is decoded at full size
            capture.release()
            raise self._limits.refuse(
                f"video {self.source!r} has {width:.0f}x{height:.0f} frames", "max_image_pixels"
            )
        native_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        index = 0
        try:
            while True:
                ok, bgr = capture.read()
                if not ok:
                    return
                position = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                timestamp = index / native_fps if native_fps > 0 else position
                index += 1
                yield timestamp, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    def run(self) -> Iterator[float]:
        """Read the source; yield the timestamp of each sampled (encoded) frame."""
        for timestamp, frame in self.frames():
            if self.push(frame, timestamp):
                yield timestamp
