"""Audio preprocessing: path, encoded bytes or a sample array -> mono float32 at 16 kHz -> log-mel frames.

Framing is causal and not centred: frame t covers samples [t * hop, t * hop + n_fft). A stream that has seen
n samples can therefore emit exactly the frames whose window is complete, and offline processing of the same
n samples (with the tail zero-padded to a whole frame) gives the same frames. The streaming layer relies on it.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from polysense.errors import InputError
from polysense.limits import DEFAULT_LIMITS, Limits
from polysense.optional import require

AudioInput = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray

SAMPLE_RATE = 16_000  # the rate every model works at, in Hz
N_FFT = 400  # 25 ms analysis window at 16 kHz
HOP_LENGTH = 160  # 10 ms between frames at 16 kHz -> 100 frames per second
N_MELS = 40  # mel bands per frame
LOG_FLOOR = 1e-6  # added to mel power before the log, so silence stays finite

# Float samples beyond this are not audio on a [-1, 1] scale (and would overflow the power spectrum).
MAX_FLOAT_AMPLITUDE = 1e6
_BLOCK = 4096
_READ_BLOCK = (
    1 << 18
)  # frames decoded at once from a file  # frames whose spectrum is computed at once (~12 MB)
_MAX_CHANNELS = 32  # more "channels" than this means the array is probably (channels, frames)
# Encoded audio is decoded only in the formats the docs list, recognised by their first bytes before libsndfile
# sees them: libsndfile could also open AU, AIFF, MP3, CAF, W64, NIST, VOC and a dozen more, but every extra
# decoder is attack surface, and a recording to classify comes as one of these three.
AUDIO_FORMATS = ("WAV", "FLAC", "OGG")
_DECODED = {"WAV", "WAVEX", "RF64", "FLAC", "OGG"}  # libsndfile's names for them, checked again once open
_CONVERT = "convert it, e.g. ffmpeg -i INPUT output.flac"


def load_audio(
    audio: AudioInput, sample_rate: int | None = None, limits: Limits = DEFAULT_LIMITS
) -> tuple[np.ndarray, int]:
    """Decode any accepted audio input to mono float32 samples in [-1, 1] and their sample rate.

    Arrays need `sample_rate`; they may be 1-D or 2-D as (frames, channels) like soundfile returns,
    of dtype float32/float64 (taken as is), int16, int32 or uint8 (scaled to [-1, 1]). A file or encoded bytes
    carry their own rate, so `sample_rate` with them is refused rather than silently ignored. Size, rate,
    channels and duration are checked against `limits` before decoding (from the header for a file).
    """
    if sample_rate is not None and not isinstance(audio, np.ndarray):
        raise InputError(
            "sample_rate is for sample arrays; an audio file or encoded bytes carries its own rate "
            "(drop sample_rate, or pass the decoded samples as an array)"
        )
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise InputError(f"audio file not found: {path}")
        limits.check_bytes(path.stat().st_size, f"audio file {path}")
        samples, rate = _read_encoded(path, str(path), limits)
    elif isinstance(audio, (bytes, bytearray, memoryview)):
        if not len(audio):
            raise InputError("audio bytes are empty")
        limits.check_bytes(len(audio), "audio bytes")
        samples, rate = _read_encoded(io.BytesIO(bytes(audio)), "audio bytes", limits)
    elif isinstance(audio, np.ndarray):
        if sample_rate is None:
            raise InputError("an audio array needs its sample rate: pass sample_rate=... (e.g. 16000)")
        rate = check_sample_rate(sample_rate)
        samples = _array_to_float(audio)  # checks the layout first; costs what the array already costs
        channels = samples.shape[1] if samples.ndim == 2 else 1
        _check_size(samples.shape[0], channels, rate, limits, "audio array")
    else:
        raise InputError(
            f"unsupported audio input of type {type(audio).__name__}; pass a path, encoded bytes or a numpy array"
        )
    mono = mix_to_mono(samples)
    if mono.size == 0:
        raise InputError("audio is empty (zero samples); pass at least one sample")
    return mono, rate


def _check_size(frames: int, channels: int, rate: int, limits: Limits, source: str) -> None:
    """Rate, channels, duration and decoded samples within `limits`, before any sample is decoded or resampled."""
    limits.check_sample_rate(rate, source)
    if channels > limits.max_audio_channels:
        raise limits.refuse(f"{source} has {channels} channels", "max_audio_channels")
    seconds = frames / rate
    if seconds > limits.max_audio_seconds:
        raise limits.refuse(f"{source} lasts {seconds:,.1f} s", "max_audio_seconds")
    if frames * channels > limits.max_audio_samples:
        what = f"{source} holds {frames * channels:,} samples ({channels} channels at {rate} Hz)"
        raise limits.refuse(what, "max_audio_samples")


def array_to_mono(array: np.ndarray) -> np.ndarray:
    """A sample array of any accepted dtype and layout -> mono float32 (possibly empty), finite or InputError."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"audio samples must be a numpy array, got {type(array).__name__}")
    return mix_to_mono(_array_to_float(array))


def mix_to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of float32 samples, already checked finite (by _checked_floats, or converted from
    integers)."""
    if samples.ndim == 2 and samples.shape[1] == 1:
        mono = samples[:, 0]  # a view: averaging one channel would copy the whole clip
    else:
        mono = samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_sample_rate(rate: object) -> int:
    """A positive whole number of Hz, or an InputError."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise InputError(f"sample rate must be a number of Hz, got {rate!r}")
    if not math.isfinite(rate) or rate <= 0 or float(rate) != int(rate):
        raise InputError(f"sample rate must be a positive whole number of Hz, got {rate!r}")
    return int(rate)


def sniff_audio_format(head: bytes) -> str | None:
    """WAV, FLAC or OGG from the first bytes of encoded audio (after an ID3 tag, if any), or None."""
    if head[:3] == b"ID3" and len(head) >= 10:  # ID3v2: 10 bytes, then a size in 7-bit bytes, then the audio
        tag_size = 10 + sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(head[6:10]))
        return "FLAC" if head[tag_size : tag_size + 4] == b"fLaC" else None
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    return {b"fLaC": "FLAC", b"OggS": "OGG"}.get(head[:4])


def _check_format(file: Path | io.BytesIO, source: str) -> None:
    if isinstance(file, Path):
        with file.open("rb") as handle:
            head = handle.read(12)
            if head[:3] == b"ID3":
                head += handle.read(1 << 21)  # tags of up to 2 MB before the FLAC stream
    else:
        head = file.getbuffer()[: 1 << 21].tobytes()
    if sniff_audio_format(head) is None:
        raise InputError(
            f"{source}: not {', '.join(AUDIO_FORMATS[:-1])} or {AUDIO_FORMATS[-1]} audio (from its first "
            f"bytes); only those are decoded: {_CONVERT}"
        )


def _read_encoded(file: Path | io.BytesIO, source: str, limits: Limits) -> tuple[np.ndarray, int]:
    soundfile = require("soundfile")
    _check_format(file, source)
    try:
        with soundfile.SoundFile(file) as handle:
            if handle.format not in _DECODED:  # what libsndfile recognised must be what the first bytes said
                raise InputError(f"{source}: {handle.format} audio is not decoded; {_CONVERT}")
            rate = check_sample_rate(handle.samplerate)
            _check_size(handle.frames, handle.channels, rate, limits, source)
            # At most the frames the header declares (checked above), however long the data really is; mixed
            # to mono block by block, so all channels are never held at once.
            samples = np.empty(handle.frames, dtype=np.float32)
            filled = 0
            while filled < handle.frames:
                block = handle.read(min(_READ_BLOCK, handle.frames - filled), dtype="float32", always_2d=True)
                if not len(block):
                    break
                samples[filled : filled + len(block)] = mix_to_mono(_checked_floats(block, source))
                filled += len(block)
            samples = samples[:filled]
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OverflowError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{source}: cannot decode audio ({error}); expected WAV, FLAC or OGG") from error
    return samples, rate


def _checked_floats(samples: np.ndarray, source: str) -> np.ndarray:
    """Float samples that are finite and on an audio scale, or an InputError (before any arithmetic on them)."""
    # max and min rather than abs(): no copy of the samples (NaN propagates through both)
    peak = max(abs(float(samples.max())), abs(float(samples.min()))) if samples.size else 0.0
    if not math.isfinite(peak):
        raise InputError(f"{source} contains NaN or Inf samples; clean or drop them before passing the audio")
    if peak > MAX_FLOAT_AMPLITUDE:
        raise InputError(
            f"{source}: float samples reach {peak:.3g}; float samples are expected in [-1, 1] "
            "(int16 values as floats: divide by 32768)"
        )
    return samples


def _array_to_float(array: np.ndarray) -> np.ndarray:
    if array.ndim not in (1, 2):
        raise InputError(f"audio array has {array.ndim} dimensions; pass [samples] or [samples, channels]")
    if array.ndim == 2 and array.shape[1] > _MAX_CHANNELS:
        raise InputError(
            f"audio array has shape {array.shape}, read as [samples, channels] with {array.shape[1]} channels; "
            "if it is [channels, samples], pass array.T"
        )
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if array.dtype == np.int32:
        return (array.astype(np.float64) / 2147483648.0).astype(np.float32)
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    if array.dtype in (np.float32, np.float64):
        return _checked_floats(array, "audio").astype(np.float32, copy=False)
    raise InputError(f"audio array has dtype {array.dtype}; pass float32, float64, int16, int32 or uint8")


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling with libsoxr (high quality), float32 in and out."""
    if from_rate == to_rate:
        return samples
    return require("soxr").resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32, copy=False)


def hz_to_mel(hz: float | np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default, htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * 3.0 / 200.0
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, linear)


def mel_to_hz(mel: float | np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * 200.0 / 3.0
    log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log_part, linear)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Triangular filters [n_mels, n_fft // 2 + 1] with Slaney area normalisation."""
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(edges_hz)
    distance = edges_hz[:, None] - fft_hz[None, :]
    rising = -distance[:-2] / widths[:-1, None]
    falling = distance[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMel:
    """Log-mel spectrogram of a mono float32 waveform; the window and filterbank are built once here."""

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        hop_length: int = HOP_LENGTH,
        n_mels: int = N_MELS,
        fmin: float = 0.0,
        fmax: float | None = None,
    ) -> None:
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        # Periodic Hann window, as used for spectral analysis (scipy's get_window("hann"), librosa's default).
        self.window = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
        self.filterbank = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax or sample_rate / 2.0)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for `num_samples` samples, the tail zero-padded to a whole frame."""
        if num_samples <= 0:
            return 0
        return 1 + math.ceil(max(num_samples - self.n_fft, 0) / self.hop_length)

    def __call__(self, waveform: np.ndarray, pad_tail: bool = True) -> np.ndarray:
        """[num_samples] float32 -> [num_frames, n_mels] float32 (natural log of mel power + LOG_FLOOR).

        With pad_tail the last partial frame is zero-padded so no sample is dropped; without it only
        complete frames are returned (what a stream can emit before its input is finished).
        """
        waveform = np.asarray(waveform, dtype=np.float32)
        complete = self._complete_frames(waveform.size)
        total = self.num_frames(waveform.size) if pad_tail else complete
        out = np.empty((total, self.n_mels), dtype=np.float32)
        self._fill(out[:complete], waveform)
        if total > complete:  # the frames running past the end: zero-pad a copy of the tail only
            start = complete * self.hop_length
            tail = np.zeros(self.n_fft + (total - complete - 1) * self.hop_length, dtype=np.float32)
            tail[: waveform.size - start] = waveform[start:]
            self._fill(out[complete:], tail)
        return out

    def _complete_frames(self, num_samples: int) -> int:
        return 0 if num_samples < self.n_fft else 1 + (num_samples - self.n_fft) // self.hop_length

    def _fill(self, out: np.ndarray, signal: np.ndarray) -> None:
        """out[i] = log-mel of the frame starting at sample i * hop_length of `signal`."""
        if not len(out):
            return
        # A strided view of the overlapping frames (no copy); as_strided directly, since sliding_window_view
        # costs ~45 us of checks per call, which adds up over the many small calls of a stream.
        step = signal.strides[0]
        frames = np.lib.stride_tricks.as_strided(
            signal, shape=(len(out), self.n_fft), strides=(self.hop_length * step, step), writeable=False
        )
        # In blocks: the spectrum of all frames at once would take ~3 KB per frame (200 MB for 10 minutes).
        for first in range(0, len(out), _BLOCK):
            out[first : first + _BLOCK] = self._log_mel(frames[first : first + _BLOCK])

    def _log_mel(self, frames: np.ndarray) -> np.ndarray:
        spectrum = np.fft.rfft(frames * self.window, axis=1)
        power = spectrum.real**2 + spectrum.imag**2
        mel = power.astype(np.float32) @ self.filterbank.T
        return np.log(mel + LOG_FLOOR).astype(np.float32)


class FrameSource(Protocol):
    """One stream's front end: samples at the model rate in, the encoder's frames out, each exactly once;
    `flush()` ends the recording as offline preprocessing ends it (FrameBuffer; SpeechFrames)."""

    width: int  # values per frame

    def reset(self) -> None: ...

    def push(self, samples: np.ndarray) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...


class FrameBuffer:
    """Turns a growing signal at the model rate into log-mel frames, each exactly once.

    Only the samples still needed by future frames are kept (at most n_fft - hop + the last chunk).
    """

    def __init__(self, logmel: LogMel) -> None:
        self.logmel = logmel
        self.width = logmel.n_mels  # values per frame
        self.reset()

    def reset(self) -> None:
        self.pending = np.zeros(0, np.float32)  # samples from the start of frame `next_frame` on
        self.next_frame = 0  # index of the next frame to emit
        self.total_samples = 0

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append samples; return the newly complete frames [k, n_mels] (k may be 0)."""
        self.pending = np.concatenate([self.pending, samples]) if self.pending.size else samples
        self.total_samples += samples.size
        return self._emit(self.pending)

    def flush(self) -> np.ndarray:
        """The remaining frames with the tail zero-padded, as offline LogMel(pad_tail=True) makes them."""
        wanted = self.logmel.num_frames(self.total_samples) - self.next_frame
        if wanted <= 0:
            return np.zeros((0, self.logmel.n_mels), np.float32)
        needed = self.logmel.n_fft + (wanted - 1) * self.logmel.hop_length
        return self._emit(np.pad(self.pending, (0, max(needed - self.pending.size, 0))))

    def _emit(self, signal: np.ndarray) -> np.ndarray:
        hop, n_fft = self.logmel.hop_length, self.logmel.n_fft
        count = 0 if signal.size < n_fft else 1 + (signal.size - n_fft) // hop
        if count == 0:
            return np.zeros((0, self.logmel.n_mels), np.float32)
        frames = self.logmel(signal[: n_fft + (count - 1) * hop], pad_tail=False)
        self.next_frame += count
        self.pending = signal[count * hop :].copy()
        return frames


@dataclass(frozen=True)
class AudioPreprocessor:
    """Any audio input -> mono 16 kHz -> log-mel frames [T, n_mels] float32."""

    sample_rate: int = SAMPLE_RATE  # rate the model works at; inputs are resampled to it
    n_fft: int = N_FFT  # analysis window, in samples at `sample_rate`
    hop_length: int = HOP_LENGTH  # samples between frames
    n_mels: int = N_MELS  # mel bands
    fmin: float = 0.0  # lowest mel edge, Hz
    fmax: float | None = None  # highest mel edge, Hz (None: sample_rate / 2)
    limits: Limits = field(default=DEFAULT_LIMITS, compare=False)  # what one input may cost
    _logmel: LogMel = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.hop_length <= 0 or self.n_fft < self.hop_length:
            raise InputError(
                f"need 0 < hop_length <= n_fft, got hop {self.hop_length} and n_fft {self.n_fft}"
            )
        logmel = LogMel(self.sample_rate, self.n_fft, self.hop_length, self.n_mels, self.fmin, self.fmax)
        object.__setattr__(self, "_logmel", logmel)

    def waveform(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        """Mono float32 samples at the model's rate."""
        samples, rate = load_audio(audio, sample_rate, self.limits)
        return resample(samples, rate, self.sample_rate)

    def frames(self) -> FrameBuffer:
        """A new stream's buffer: samples at the model rate in, log-mel frames out."""
        return FrameBuffer(self._logmel)

    def __call__(self, audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
        frames = self._logmel(self.waveform(audio, sample_rate))
        if frames.shape[0] == 0:  # a few samples at a high rate can resample to none at the model's rate
            raise InputError(
                f"audio too short: nothing is left after resampling to {self.sample_rate} Hz; "
                "pass at least a millisecond of audio"
            )
        return frames
