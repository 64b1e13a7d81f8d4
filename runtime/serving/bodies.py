"""Reading request bodies within bounds: per request (max_body_bytes), all requests together (a budget), and in
time (body_timeout_s: a client that sends slowly or not at all releases what it holds). Bodies are held in
memory, multipart files included: nothing a client sends is written to disk."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING

from polysense.errors import InputError, OverloadedError
from polysense.preprocess.voice import MAX_PROFILE_BYTES, VoiceProfile
from polysense.serving.handler import (
    BodyTimeout,
    ClientGone,
    PayloadTooLarge,
    UnsupportedMediaType,
    body_limit,
    parse_json,
    sample_from_json,
)

if TYPE_CHECKING:  # Starlette is imported by the app that uses these (polysense.serving.http), not here
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

# Bodies held in memory at once, all requests together: a flood of large bodies is refused, not buffered.
BODY_BUDGET_BYTES = 512 << 20
LARGE_BODY = 64 << 10  # JSON bodies from this size on are parsed on a worker thread


class BodyBudget:
    """Counts the bytes of request bodies held right now (used on the event loop only, so no lock). A request's
    bytes stay counted until `release(request)`, when its answer has gone: the body, its parse and its decoded
    files live that long."""

    def __init__(
        self, max_body_bytes: int, budget_bytes: int = BODY_BUDGET_BYTES, timeout_s: float = 30.0
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.budget_bytes = budget_bytes
        self.timeout_s = timeout_s  # from the request's start to its body's last byte
        self.held = 0

    def check_declared(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(
                f"the body is {int(declared):,} bytes, over {body_limit(self.max_body_bytes)}"
            )

    async def read(self, request: Request) -> bytes:
        """The body, refused at once when over max_body_bytes or when the bodies in flight would pass the budget
        (bytes are counted as they arrive; a lying Content-Length gains nothing)."""
        return b"".join([chunk async for chunk in self.stream(request)])

    async def stream(self, request: Request) -> AsyncGenerator[bytes, None]:
        """The body's chunks, each counted as it arrives; BodyTimeout when the whole body has not arrived within
        timeout_s, ClientGone when the client hangs up first. What was counted stays counted until `release`."""
        import anyio
        from starlette.requests import ClientDisconnect

        self.check_declared(request)
        chunks = request.stream()
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                self._take(request, len(chunk))
                yield chunk
        except TimeoutError:
            raise BodyTimeout(
                f"the body did not arrive within {self.timeout_s:g} s (polysense serve --body-timeout-s); send it at once"
            ) from None
        except ClientDisconnect:
            raise ClientGone from None
        finally:
            await chunks.aclose()

    def _take(self, request: Request, size: int) -> None:
        taken = getattr(request.state, "body_bytes", 0) + size
        request.state.body_bytes = taken
        self.held += size
        if taken > self.max_body_bytes:
            raise PayloadTooLarge(f"the body is over {body_limit(self.max_body_bytes)}")
        if self.held > self.budget_bytes:
            raise OverloadedError("too many large requests at once; retry shortly")

    def release(self, request: Request) -> None:
        self.held -= getattr(request.state, "body_bytes", 0)
        request.state.body_bytes = 0


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_sample(
    request: Request, bodies: BodyBudget, in_thread: Callable[[Callable[[], dict]], Awaitable[dict]]
) -> dict:
    """One predict sample from a JSON or multipart body. A large JSON body (base64 files) is parsed and decoded
    `in_thread`, off the event loop that every other request needs."""
    kind = content_type(request)
    if kind == "application/json":
        body = await bodies.read(request)
        if len(body) < LARGE_BODY:
            return sample_from_json(parse_json(body))
        return await in_thread(lambda: sample_from_json(parse_json(body)))
    if kind == "multipart/form-data":
        return await read_multipart(request, bodies)
    raise UnsupportedMediaType(
        f"content type {kind or 'none'!r} is not read here; send application/json or multipart/form-data"
    )


async def read_multipart(request: Request, bodies: BodyBudget) -> dict:
    """Fields text and sample_rate, files image and audio (curl -F image=@photo.jpg -F text=...), and voice (a
    profile as `polysense voice` writes it: a file part, -F voice=@profile.json, or the JSON as a field)."""
    from starlette.formparsers import MultiPartParser

    class InMemoryParser(MultiPartParser):
        spool_max_size = 0  # file parts are never rolled over to disk: the body budget bounds their memory

    if not request.headers.get("content-length", "").isdigit():
        raise InputError("a multipart request needs a Content-Length header")
    parser = InMemoryParser(
        request.headers,
        bodies.stream(request),
        max_files=3,
        max_fields=5,
        max_part_size=bodies.max_body_bytes,
    )
    try:
        form = await parser.parse()
    except (ClientGone, BodyTimeout, PayloadTooLarge, OverloadedError):
        raise
    except Exception as error:  # python-multipart's and Starlette's own parse errors
        raise InputError(f"the multipart body cannot be read ({error})") from None
    try:
        sample: dict[str, object] = {}
        for key, value in form.multi_items():
            if key in sample:
                raise InputError(f"field {key!r} is given twice")
            sample[key] = await _form_value(key, value)
        return sample
    finally:
        await form.close()


async def _form_value(key: str, value: str | UploadFile) -> str | bytes | int | VoiceProfile:
    if key in ("image", "audio"):
        if isinstance(value, str):
            raise InputError(f"{key} must be a file part (curl -F {key}=@file)")
        return await value.read()
    if key == "text":
        return value if isinstance(value, str) else (await value.read()).decode("utf-8", "replace")
    if key == "sample_rate":
        if not isinstance(value, str) or not (value.isascii() and value.isdigit() and len(value) <= 9):
            raise InputError("sample_rate must be an integer (Hz)")
        return int(value)
    if key == "voice":
        # Read no more than a profile may hold: the size is refused before any parsing (from_json).
        raw = value if isinstance(value, str) else await value.read(MAX_PROFILE_BYTES + 1)
        return VoiceProfile.from_json(raw, "voice")
    raise InputError(f"unknown field {key!r}; the fields are text, image, audio, sample_rate, voice")
