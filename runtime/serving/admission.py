"""Admission before anything else: under overload, refusing must cost less than serving.

Prediction requests without the API key are answered 401 first (a caller without the key learns nothing, not
even the queue's state), then, while the queue is full (Service.refusal), 503 with Retry-After. `polysense
serve` refuses them in its connection protocol as soon as their head is parsed (polysense.serving.connections:
no ASGI task, no routing, no JSON parse), which lets one core refuse tens of thousands a second; the plain ASGI
middleware here (no Request object, no routing, no body read) refuses what reaches the app anyway: every
request on a Ray Serve replica, and pipelined requests, which the protocol leaves to the app so that answers
go back in order.

A request this lets through holds no place yet: it takes one (Service.admit, in polysense.serving.http) only once
its body has arrived in full, so clients that send their bodies slowly hold bytes of the body budget, never
places others could use. Whoever finds the queue full by then is answered 503 with Retry-After as well.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from polysense.errors import PolysenseError
from polysense.serving.handler import Unauthorized, failure_answer

if (
    TYPE_CHECKING
):  # the app that uses this middleware imports Starlette (polysense.serving.http), not this module
    from starlette.types import ASGIApp, Receive, Scope, Send

    from polysense.serving.service import Service

ADMITTED_PATHS = ("/v1/predict", "/v1/predict_batch")
# Set in the scope of a request that polysense.serving.connections let through at its head: not admitted twice.
ADMITTED_AT_HEAD = "polysense.admitted_at_head"


class Admission:
    """Refuses prediction requests without the API key, and those that find `service`'s queue full."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ADMITTED_PATHS or scope.get(ADMITTED_AT_HEAD):
            await self.app(scope, receive, send)
            return
        service = self.service
        start = time.perf_counter()
        refusal = refusal_of(service, scope["headers"])
        if refusal is not None:
            status = await _refuse(send, refusal)
            name = scope["path"].rsplit("/", 1)[-1]
            service.metrics.observe(name, status, time.perf_counter() - start, type(refusal).__name__)
            return
        await self.app(scope, receive, send)


def refusal_of(
    service: Service, headers: Iterable[tuple[bytes, bytes]], ahead: int | None = None
) -> PolysenseError | None:
    """Why a prediction request with these (lower-case) headers is refused before its body is read: Unauthorized
    first, then the queue's OverloadedError (behind `ahead` in flight, Service.refusal); None: it goes on."""
    if service.options.api_key is not None:
        try:
            service.authorize(_authorization(headers))
        except Unauthorized as error:
            return error
    service.arrival()
    return service.refusal(ahead=ahead)


def _authorization(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request's Authorization header by lower-case name (the one header that is read)."""
    return {
        name.decode("latin-1"): value.decode("latin-1") for name, value in headers if name == b"authorization"
    }


async def _refuse(send: Send, error: PolysenseError) -> int:
    status, answer, extra = failure_answer(error)
    body = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status
