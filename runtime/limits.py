"""What one input may cost before polysense refuses it, checked before the expensive work.

The defaults fit any sane input and keep the worst case bounded: measured on a 2-core machine, any single input
of up to 10 MB costs at most 256 MB of extra peak memory and 2 s, or is refused within that (see
docs/security.md, "Limits", benchmarks/results/limits.md and fuzz.md). Raise a limit per pipeline:

    polysense.Pipeline.load("bundle/", limits=polysense.Limits(max_image_pixels=60_000_000))
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from polysense.errors import ConfigError, LimitError

MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    # Encoded image or audio (a file or bytes); read from the file's size before it is read.
    max_input_bytes: int = 64 * MB
    # Pixels of one image, read from its header before decoding. Decoding costs about 6 bytes per pixel (OpenCV
    # decodes, then copies) and up to 9 for a progressive JPEG: 25 MP (a 24 MP camera's photo) stays under 256 MB.
    max_image_pixels: int = 25_000_000
    # Seconds of one audio clip, from its header before decoding (an array: from its length and rate).
    max_audio_seconds: float = 600.0
    # Samples of one clip over all its channels, from its header: bounds the decoding work and memory (4 bytes
    # each) whatever the rate and channel count; 30 M is 5 minutes of 48 kHz stereo.
    max_audio_samples: int = 30_000_000
    # Sample rates accepted for files, arrays and streams, in Hz: a rate of a few Hz would make resampling to
    # the model's rate multiply the samples by thousands.
    min_sample_rate: int = 1_000
    max_sample_rate: int = 768_000
    # Audio channels (interleaved in a file, or the columns of an array).
    max_audio_channels: int = 32

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"Limits.{field.name} must be a positive number, got {value!r}")
        if self.min_sample_rate > self.max_sample_rate:
            raise ConfigError("Limits.min_sample_rate is above Limits.max_sample_rate")

    def refuse(self, what: str, limit: str) -> LimitError:
        """The error for an input beyond `limit` (a field name), naming how to change it."""
        value = getattr(self, limit)
        side = "under" if limit.startswith("min_") else "over"
        return LimitError(
            f"{what}: {side} the limit {limit}={value:,}; if the input is genuine, allow it with "
            f"Pipeline.load(..., limits=polysense.Limits({limit}=...))",
            too_large=side == "over",
        )

    def check_bytes(self, size: int, what: str) -> None:
        if size > self.max_input_bytes:
            raise self.refuse(f"{what} is {size / MB:.1f} MB", "max_input_bytes")

    def check_sample_rate(self, rate: int, what: str) -> None:
        if rate < self.min_sample_rate:
            raise self.refuse(f"{what} has a sample rate of {rate} Hz", "min_sample_rate")
        if rate > self.max_sample_rate:
            raise self.refuse(f"{what} has a sample rate of {rate} Hz", "max_sample_rate")


DEFAULT_LIMITS = Limits()
