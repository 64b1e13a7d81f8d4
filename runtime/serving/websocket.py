"""WS /v1/stream: live audio in, partial and final predictions out.

    client: {"sample_rate": 16000, "format": "s16le" | "f32le", "text": "optional"}    (text message)
    server: {"type": "ready", "model_sample_rate": 16000}
    client: PCM chunks, little-endian, any length                                     (binary messages)
    server: {"type": "partial", "label", "probabilities", "audio_seconds", ...} after each chunk with new frames
    client: {"type": "end"}
    server: {"type": "final", ...}, then closes (1000). The final prediction equals Pipeline.predict on the
            whole recording.
    on a bad message: {"type": "error", "error", "type"} and a close (1003, or 1009 when over a limit);
            no start message within ws_start_timeout_s: the same, with 1008.

Streams' new frames are encoded together across connections (polysense.serving.streams.StreamEncoder).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket, WebSocketDisconnect

from polysense.errors import InputError, PolysenseError
from polysense.inference.predictor import LiveAudioStream
from polysense.serving.handler import (
    PayloadTooLarge,
    Unauthorized,
    body_limit,
    error_json,
    parse_json,
    pcm_chunk,
    prediction_json,
    status_of,
    stream_start_from_json,
)
from polysense.serving.service import Service
from polysense.serving.streams import StreamEncoder

WS_POLICY_VIOLATION, WS_UNSUPPORTED, WS_TOO_BIG, WS_TRY_AGAIN = 1008, 1003, 1009, 1013
MAX_START_MESSAGE = 1 << 20


async def stream(websocket: WebSocket) -> None:
    service: Service = websocket.app.state.service
    # Refusals are made after the handshake, so the client gets the close code (before it, a server can only
    # answer HTTP 403, the same for every reason).
    await websocket.accept()
    try:
        service.authorize(websocket.headers)
    except Unauthorized:
        await websocket.close(WS_POLICY_VIOLATION, "missing or wrong API key")
        return
    encoder = service.streams
    if encoder is None:
        await websocket.close(WS_UNSUPPORTED, "this bundle has no audio encoder")
        return
    if not service.ready.is_set() or service.open_streams >= service.options.max_streams:
        await websocket.close(WS_TRY_AGAIN, "warming up or too many streams; retry shortly")
        return
    service.open_streams += 1
    service.metrics.streams.inc()
    try:
        await _run(websocket, service, encoder)
    except WebSocketDisconnect:
        pass
    except PolysenseError as error:
        with contextlib.suppress(Exception):
            await websocket.send_json({"type": "error", **error_json(error)})
            code = WS_TOO_BIG if status_of(error) == 413 else WS_UNSUPPORTED
            await websocket.close(WS_POLICY_VIOLATION if isinstance(error, StartTimeout) else code)
    finally:
        service.open_streams -= 1
        service.metrics.streams.dec()


class StartTimeout(InputError):
    """A stream whose start message did not come within ServeOptions.ws_start_timeout_s."""


async def _run(websocket: WebSocket, service: Service, encoder: StreamEncoder) -> None:
    import anyio

    seconds = service.options.ws_start_timeout_s
    try:
        with anyio.fail_after(seconds):  # a connection that never starts gives its place back
            message = await websocket.receive()
    except TimeoutError:
        raise StartTimeout(f"no start message within ws_start_timeout_s={seconds:g} s") from None
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    first = message.get("text")
    if first is None:
        raise InputError('start the stream with a text message {"sample_rate": 16000, "format": "s16le"}')
    if len(first) > MAX_START_MESSAGE:
        raise PayloadTooLarge("the first message is over 1 MB")
    start = stream_start_from_json(parse_json(first.encode()))
    limits = service.pipeline.limits
    limits.check_sample_rate(start.sample_rate, "the stream")
    audio = service.pipeline.audio_stream(encode=False, voice=start.voice)
    if start.text is not None:
        await service.in_thread(audio.set_text, start.text)
    await websocket.send_json({"type": "ready", "model_sample_rate": audio.model_rate})
    samples_seen = 0
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        data = message.get("bytes")
        if data is None:
            break
        if len(data) > service.options.max_body_bytes:
            raise PayloadTooLarge(
                f"a chunk of {len(data):,} bytes, over {body_limit(service.options.max_body_bytes)}"
            )
        samples = pcm_chunk(data, start.dtype)
        samples_seen += samples.size
        if samples_seen > limits.max_audio_seconds * start.sample_rate:
            raise limits.refuse(f"the stream is over {limits.max_audio_seconds:g} s", "max_audio_seconds")
        if await service.in_thread(audio.accept_waveform, samples, start.sample_rate):
            await asyncio.wrap_future(encoder.encode(audio))
        if audio.embedding is not None:
            await websocket.send_json(
                await _result(service, audio, "partial", samples_seen / start.sample_rate)
            )
    if parse_json((message.get("text") or "").encode()) != {"type": "end"}:
        raise InputError('send PCM chunks as binary messages and {"type": "end"} as text when done')
    if await service.in_thread(audio.input_finished):
        await asyncio.wrap_future(encoder.encode(audio))
    await websocket.send_json(await _result(service, audio, "final", samples_seen / start.sample_rate))
    await websocket.close(1000)


async def _result(service: Service, audio: LiveAudioStream, kind: str, seconds: float) -> dict:
    prediction = await service.in_thread(audio.result)
    return {"type": kind, "audio_seconds": seconds, **prediction_json(prediction)}
