"""A timeline of predictions over a live or recorded stream: what `polysense stream` prints."""

from __future__ import annotations

import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np

from polysense.errors import InputError
from polysense.inference.pipeline import Pipeline, Prediction
from polysense.inference.streaming import VideoSource
from polysense.optional import require
from polysense.preprocess.audio import check_sample_rate
from polysense.preprocess.voice import VoiceProfile


def audio_chunks(
    source: str, chunk_ms: float, stdin_rate: int, stdin: BinaryIO | None = None
) -> Iterator[tuple[np.ndarray, int]]:
    """(samples, sample_rate) chunks of `chunk_ms` from a file, or from stdin when source is '-': a WAV stream
    (its header gives the rate) or raw 16-bit little-endian mono PCM at `stdin_rate`."""
    if not 0 < chunk_ms < float("inf"):  # also refuses NaN
        raise InputError(f"--chunk-ms must be a positive number of milliseconds, got {chunk_ms}")
    stdin_rate = check_sample_rate(stdin_rate)
    if source != "-":
        yield from _file_chunks(source, chunk_ms)
        return
    stream = stdin or sys.stdin.buffer
    head = stream.read(len(WAV_MAGIC))
    if head == WAV_MAGIC:  # `cat clip.wav |`, `arecord |`: its header is not 22 samples of sound
        yield from _wav_chunks(_Prefixed(head, stream), chunk_ms)
    else:
        yield from _pcm_chunks(_Prefixed(head, stream), chunk_ms, stdin_rate)


WAV_MAGIC = b"RIFF"  # how a WAV stream starts


class _Prefixed:
    """A byte stream with the bytes already read from it put back in front (stdin cannot seek back)."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        taken, self.head = (self.head, b"") if size < 0 else (self.head[:size], self.head[size:])
        wanted = -1 if size < 0 else size - len(taken)
        return taken + (self.stream.read(wanted) if wanted else b"")


def _pcm_chunks(stream: _Prefixed, chunk_ms: float, rate: int) -> Iterator[tuple[np.ndarray, int]]:
    size = max(1, round(rate * chunk_ms / 1000)) * 2  # bytes of int16 mono
    leftover = b""
    while data := stream.read(size):
        data = leftover + data
        usable = len(data) - len(data) % 2  # an odd byte waits for its partner
        leftover = data[usable:]
        if usable:
            yield np.frombuffer(data[:usable], dtype="<i2").copy(), rate


def _wav_chunks(stream: _Prefixed, chunk_ms: float) -> Iterator[tuple[np.ndarray, int]]:
    """A 16-bit PCM WAV read as it arrives (the standard library's reader does not need to seek)."""
    fix = "pipe 16-bit PCM WAV or raw PCM (with --sample-rate), or stream a file with --audio FILE"
    try:
        reader = wave.open(cast(BinaryIO, stream), "rb")  # noqa: SIM115 (closed by the with below)
    except (wave.Error, EOFError) as error:
        raise InputError(f"stdin holds a WAV stream that cannot be read ({error}); {fix}") from error
    with reader:
        width, channels = reader.getsampwidth(), reader.getnchannels()
        if width != 2:
            raise InputError(f"stdin holds a WAV stream of {8 * width}-bit samples; {fix}")
        rate = check_sample_rate(reader.getframerate())
        step = max(1, round(rate * chunk_ms / 1000))
        while data := reader.readframes(step):
            usable = len(data) - len(data) % (2 * channels)  # a stream cut mid-frame drops the part frame
            yield np.frombuffer(data[:usable], dtype="<i2").reshape(-1, channels).copy(), rate


def _file_chunks(source: str, chunk_ms: float) -> Iterator[tuple[np.ndarray, int]]:
    if not Path(source).is_file():  # as `predict --audio` says it (soundfile would say "System error")
        raise InputError(f"audio file not found: {source}")
    try:
        samples, rate = require("soundfile").read(source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for undecodable files
        raise InputError(f"{source}: cannot read audio ({error})") from error
    step = max(1, round(rate * chunk_ms / 1000))
    for start in range(0, samples.shape[0], step):
        yield samples[start : start + step], rate


def _event(time_s: float, prediction: Prediction, **extra: object) -> dict:
    return {
        "time": round(time_s, 3),
        "label": prediction.label,
        "probability": round(prediction.probabilities[prediction.label], 4),
        "modalities": list(prediction.embeddings),
        **extra,
    }


def stream_timeline(
    pipeline: Pipeline,
    audio: str | None = None,
    video: VideoSource | None = None,
    text: str | None = None,
    chunk_ms: float = 100.0,
    stdin_rate: int = 16_000,
    fps: float = 5.0,
    stdin: BinaryIO | None = None,
    voice: VoiceProfile | None = None,
) -> Iterator[dict]:
    """One event per audio chunk (or per sampled video frame without audio), then a final one."""
    if audio is None and video is None:
        raise InputError("nothing to stream: give --audio FILE (or - for stdin) and/or --video FILE")
    if voice is not None and audio is None:
        raise InputError("a voice profile is for the audio stream; give --audio too (or drop --voice)")
    video_stream = pipeline.video_stream(video, fps=fps) if video is not None else None
    if audio is None:
        assert video_stream is not None  # refused above when neither was given
        video_stream.set_text(text or None)
        for time_s in video_stream.run():
            yield _event(time_s, video_stream.result(), video_frames=video_stream.frames_encoded)
        if video_stream.frames_encoded == 0:
            raise InputError(f"{video}: no video frame could be read")
        yield {
            "final": True,
            **_event(time_s, video_stream.result(), video_frames=video_stream.frames_encoded),
        }
        return

    stream = pipeline.audio_stream(voice=voice)
    stream.set_text(text or None)
    frames = video_stream.frames() if video_stream else iter(())
    next_frame = next(frames, None)
    stream.attach_video(video_stream)
    time_s = 0.0
    for samples, rate in audio_chunks(audio, chunk_ms, stdin_rate, stdin):
        time_s += samples.shape[0] / rate
        new_frames = stream.accept_waveform(samples, rate)
        while video_stream is not None and next_frame is not None and next_frame[0] <= time_s:
            video_stream.push(next_frame[1], next_frame[0])
            next_frame = next(frames, None)
        if stream.embedding is not None or video_stream is not None or stream.text_embedding is not None:
            yield _event(time_s, stream.result(), audio_frames=new_frames)
    new_frames = stream.input_finished()
    if stream.embedding is None:
        raise InputError(f"{audio}: no audio samples were read")
    yield {"final": True, **_event(time_s, stream.result(), audio_frames=new_frames)}
