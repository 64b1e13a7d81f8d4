"""A timeline of predictions over a live or recorded stream: what `polysense stream` prints."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import BinaryIO

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
    """(samples, sample_rate) chunks of `chunk_ms` from a file, or raw 16-bit PCM from stdin when source is '-'."""
    if not 0 < chunk_ms < float("inf"):  # also refuses NaN
        raise InputError(f"--chunk-ms must be a positive number of milliseconds, got {chunk_ms}")
    stdin_rate = check_sample_rate(stdin_rate)
    if source == "-":
        stream = stdin or sys.stdin.buffer
        size = max(1, round(stdin_rate * chunk_ms / 1000)) * 2  # bytes of int16 mono
        leftover = b""
        while True:
            data = stream.read(size)
            if not data:
                return
            data = leftover + data
            usable = len(data) - len(data) % 2  # an odd byte waits for its partner
            leftover = data[usable:]
            if usable:
                yield np.frombuffer(data[:usable], dtype="<i2").copy(), stdin_rate
    try:
        samples, rate = require("soundfile").read(source, dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for missing or undecodable files
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
