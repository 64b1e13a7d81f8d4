"""What a polysense server does with a request, whatever carries it (Starlette here, Ray Serve for scale-out):
parse and check the request body, and shape the answers. No HTTP framework is imported here."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from polysense.errors import (
    ConfigError,
    InputError,
    LimitError,
    OverloadedError,
    PolysenseError,
    RequestTimeoutError,
)
from polysense.inference.fusion import Prediction
from polysense.inference.predictor import AnyPredictor
from polysense.modalities import MODALITIES
from polysense.preprocess.voice import VoiceProfile
from polysense.serving.batcher import BatcherOptions

FILE_FIELDS = ("image", "audio")  # sent as base64 in JSON, as files in multipart
PCM_FORMATS = {"s16le": np.int16, "f32le": np.float32}


@dataclass(frozen=True)
class ServeOptions:
    """How `polysense serve` behaves; every field is a CLI option of the same name.

    max_queue bounds the predictions in flight (queued or being prepared), so it bounds the wait of an admitted
    request to about max_queue / throughput; max_queue_delay_ms bounds that wait in time (polysense.serving.
    service.Service.refusal); max_body_bytes bounds one request body (and one WebSocket message);
    max_batch_samples the samples of one /v1/predict_batch (at most max_queue); max_streams the open /v1/stream
    connections; api_key, when set, is the bearer token every /v1 and /metrics request must carry.
    """

    max_batch: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 128  # four full batches: an admitted request waits about four model runs at most
    # Admission by expected wait: while requests arrive faster than admitted ones leave (polysense.serving.
    # service.Service.refusal), a request is refused (503, at once) when in-flight samples x the measured seconds
    # per sample exceed this; 0: off. Measured on an idle 2-core machine under 4x overload
    # (benchmarks/serving_overload.py): accepted p99 38-42 ms with 5 against 131-173 ms off, closed loops of 8
    # and 32 clients unchanged there. Off by default all the same: 16 closed-loop clients of a server slowed by
    # its shutdown on a busy machine got 503s from it (a window in which it answers fewer than its clients
    # looks like overload), and a client that waits for its answer should never be refused.
    max_queue_delay_ms: float = 0.0
    timeout_s: float = 30.0
    max_body_bytes: int = 32 << 20
    max_batch_samples: int = 64
    max_streams: int = 256
    api_key: str | None = None
    # Per connection, against slow or silent clients (polysense.serving.connections):
    header_timeout_s: float = (
        10.0  # from the connection's first byte (or its last answer) to a request's end of headers
    )
    max_header_bytes: int = (
        64 << 10
    )  # request line and headers together; beyond: 431 and the connection closed
    body_timeout_s: float = 30.0  # from a request's start to its body's last byte; beyond: 408
    idle_timeout_s: float = 5.0  # a kept-alive connection with no request in flight is closed after this
    max_connections: int = (
        1024  # open connections at most (WebSocket streams included); beyond: closed at once
    )
    ws_start_timeout_s: float = 10.0  # a /v1/stream connection must send its start message within this

    def __post_init__(self) -> None:
        if not 0 <= self.max_queue_delay_ms <= 600_000:
            raise ConfigError(f"max_queue_delay_ms must be 0-600000 (0: off), got {self.max_queue_delay_ms}")
        if not 1 <= self.max_body_bytes <= 1 << 31:
            raise ConfigError(
                f"--max-body-mb must be at most 2048 (max_body_bytes 1 B-2 GB), got {self.max_body_bytes} B"
            )
        if not 1 <= self.max_batch_samples <= 100_000:
            raise ConfigError(f"max_batch_samples must be 1-100000, got {self.max_batch_samples}")
        if not 1 <= self.max_streams <= 100_000:
            raise ConfigError(f"max_streams must be 1-100000, got {self.max_streams}")
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "ws_start_timeout_s"):
            seconds = getattr(self, name)
            if not 0 < seconds <= 3600:
                raise ConfigError(f"{name} must be over 0 and at most 3600 s, got {seconds}")
        if not 1 << 10 <= self.max_header_bytes <= 16 << 20:
            raise ConfigError(f"max_header_bytes must be 1 KB-16 MB, got {self.max_header_bytes}")
        if not 1 <= self.max_connections <= 1_000_000:
            raise ConfigError(f"max_connections must be 1-1000000, got {self.max_connections}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ConfigError(
                "the API key must be at least 16 characters; generate one with `openssl rand -hex 32`"
            )
        self.batcher_options()  # checks max_batch, max_wait_ms, max_queue and timeout_s
        if self.max_batch_samples > self.max_queue:
            # such a request could never be admitted: a 503 "retry" that no retry cures
            raise ConfigError(
                f"max_batch_samples ({self.max_batch_samples}) is over max_queue ({self.max_queue}); "
                "lower it or raise max_queue"
            )

    def batcher_options(self) -> BatcherOptions:
        return BatcherOptions(self.max_batch, self.max_wait_ms, self.max_queue, self.timeout_s)


def body_limit(max_body_bytes: int) -> str:
    """The body limit as a client or an operator reads it: its size and the `polysense serve` flag that sets it."""
    return f"this server's limit of {max_body_bytes:,} bytes (polysense serve --max-body-mb {max_body_bytes / (1 << 20):g})"


class Unauthorized(PolysenseError):
    """A request without the server's bearer token."""


class PayloadTooLarge(InputError):
    """A request body over ServeOptions.max_body_bytes."""


class UnsupportedMediaType(InputError):
    """A request body of a content type the server does not read."""


class BodyTimeout(InputError):
    """A request body that did not arrive within ServeOptions.body_timeout_s."""


class ClientGone(Exception):
    """The caller hung up before its answer was ready (or before its body arrived)."""


def parse_json(body: bytes) -> object:
    """The JSON value of a body (callers check its shape), or an InputError."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, bad UTF-8, an integer of 5,000 digits
        raise InputError(f"the body is not valid JSON ({str(error)[:200]}); send a JSON object") from None


def sample_from_json(payload: object, where: str = "") -> dict:
    """A predict sample from a JSON object: {"text": str, "image": base64, "audio": base64, "sample_rate": int,
    "voice": profile}. Image and audio are the bytes of an encoded file (JPEG/PNG/WebP/BMP; WAV/FLAC/OGG),
    base64-encoded; voice is a speaker's profile as `polysense voice` writes it (bundles trained with
    --voice-norm)."""
    if not isinstance(payload, dict):
        raise InputError(f'{where}send a JSON object like {{"text": "...", "image": "<base64>"}}')
    unknown = [k for k in payload if k not in (*MODALITIES, "sample_rate", "voice")]
    if unknown:
        raise InputError(
            f"{where}unknown field {unknown[0]!r}; the fields are text, image, audio (base64), sample_rate, voice"
        )
    sample: dict[str, object] = {}
    text = payload.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise InputError(f"{where}text must be a string")
        sample["text"] = text
    for name in FILE_FIELDS:
        value = payload.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InputError(f"{where}{name} must be the file's bytes as a base64 string")
        try:
            sample[name] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(
                f"{where}{name} is not valid base64; encode the file's bytes with base64"
            ) from None
    rate = payload.get("sample_rate")
    if rate is not None:
        if isinstance(rate, bool) or not isinstance(rate, int):
            raise InputError(f"{where}sample_rate must be an integer (Hz)")
        sample["sample_rate"] = rate
    if payload.get("voice") is not None:
        sample["voice"] = VoiceProfile.from_dict(payload["voice"], f"{where}voice")
    return sample


def samples_from_batch_json(payload: object, max_samples: int) -> list[object]:
    """The raw sample objects of a /v1/predict_batch body {"samples": [...]} (each parsed on its own later)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("samples"), list):
        raise InputError('send a JSON object {"samples": [{...}, ...]}')
    samples = payload["samples"]
    if not samples:
        raise InputError('"samples" is empty; send at least one sample')
    if len(samples) > max_samples:
        raise PayloadTooLarge(
            f"{len(samples)} samples in one request, over this server's limit of {max_samples} "
            "(polysense serve --max-batch-samples); split the request"
        )
    return samples


def prediction_json(prediction: Prediction) -> dict:
    return prediction.to_dict()


def error_json(error: BaseException) -> dict:
    return {"error": str(error), "type": type(error).__name__}


INTERNAL_ERROR = {"error": "internal error; see the server log", "type": "InternalError"}


def authorize(api_key: str | None, headers: Mapping[str, str]) -> None:
    """Raise Unauthorized unless `headers` carry `Authorization: Bearer <api_key>` (or no key is set)."""
    if api_key is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Unauthorized("missing or wrong API key; send the header 'Authorization: Bearer <key>'")


def failure_answer(error: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, JSON body, headers) of the answer to a failed request; never a traceback."""
    status = status_of(error)
    headers = {}
    if isinstance(error, OverloadedError):
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return status, (INTERNAL_ERROR if status == 500 else error_json(error)), headers


def status_of(error: BaseException) -> int:
    """The HTTP status for an error a request caused (500 for anything polysense did not raise on purpose)."""
    if isinstance(error, Unauthorized):
        return 401
    if isinstance(error, PayloadTooLarge) or (isinstance(error, LimitError) and error.too_large):
        return 413
    if isinstance(error, UnsupportedMediaType):
        return 415
    if isinstance(error, BodyTimeout):
        return 408
    if isinstance(error, InputError):
        return 400
    if isinstance(error, OverloadedError):
        return 503
    if isinstance(error, RequestTimeoutError):
        return 504
    return 500


def info_json(pipeline: AnyPredictor, options: ServeOptions) -> dict:
    from polysense.version import __version__

    audio = pipeline.description.preprocessing.audio
    return {
        "polysense": __version__,
        "labels": list(pipeline.labels),
        "modalities": list(pipeline.modalities),
        "members": len(getattr(pipeline, "members", ())) or 1,  # an Ensemble's bundles; one Pipeline: 1
        "precisions": pipeline.precisions,  # an Ensemble: one entry per member, as providers
        "providers": pipeline.providers,
        "embed_dim": pipeline.embed_dim,
        "max_batch": options.max_batch,
        "stream": None
        if audio is None
        else {"model_sample_rate": audio.sample_rate, "formats": list(PCM_FORMATS)},
    }


def warm_up(pipeline: AnyPredictor) -> float:
    """Run every encoder and the fusion once on synthetic inputs (first runs allocate and tune); seconds."""
    start = time.perf_counter()
    sample: dict[str, object] = {}
    if "text" in pipeline.modalities:
        sample["text"] = "warm up"
    if "image" in pipeline.modalities:
        side = max(1, min(64, math.isqrt(pipeline.limits.max_image_pixels)))  # within the pixel limit
        sample["image"] = np.full((side, side, 3), 128, np.uint8)
    if "audio" in pipeline.modalities:
        rate = pipeline.description.preprocessing.of("audio").sample_rate
        sample["audio"], sample["sample_rate"] = np.zeros(rate, np.float32), rate
    pipeline.predict_batch([sample])
    return time.perf_counter() - start


@dataclass(frozen=True)
class StreamStart:
    """The first message of a /v1/stream connection."""

    sample_rate: int
    dtype: type
    text: str | None = None
    voice: VoiceProfile | None = None  # the speaker's profile (bundles trained with --voice-norm)


def stream_start_from_json(payload: object) -> StreamStart:
    """{"sample_rate": 16000, "format": "s16le" | "f32le", "text": optional str, "voice": optional profile}."""
    if not isinstance(payload, dict):
        raise InputError('start a stream with a JSON object {"sample_rate": 16000, "format": "s16le"}')
    unknown = [k for k in payload if k not in ("sample_rate", "format", "text", "voice")]
    if unknown:
        raise InputError(
            f"unknown field {unknown[0]!r}; a stream starts with sample_rate, format, text and voice"
        )
    rate = payload.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise InputError("sample_rate (an integer, Hz) is required to start a stream")
    fmt = payload.get("format", "s16le")
    if fmt not in PCM_FORMATS:
        raise InputError(
            f"format {fmt!r} is unknown; send s16le (int16 PCM) or f32le (float32 PCM), little-endian"
        )
    text = payload.get("text")
    if text is not None and not isinstance(text, str):
        raise InputError("text must be a string")
    voice = payload.get("voice")
    return StreamStart(rate, PCM_FORMATS[fmt], text, None if voice is None else VoiceProfile.from_dict(voice))


def pcm_chunk(data: bytes, dtype: type) -> np.ndarray:
    """Little-endian PCM bytes as samples."""
    width = np.dtype(dtype).itemsize
    if len(data) % width:
        raise InputError(f"a chunk of {len(data)} bytes is not whole {width}-byte samples")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
