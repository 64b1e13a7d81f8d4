"""Admission before anything else: under overload, refusing must cost less than serving.

A plain ASGI middleware (no Request object, no routing, no body read) answers prediction requests without the
API key with 401 first (a caller without the key learns nothing, not even the queue's state), then, while
max_queue requests are in flight already, with 503 and Retry-After. Everything a refused request costs the server
is uvicorn's parse of its head and two small messages back.

A request this lets through holds no place yet: it takes one (Service.admit, in polysense.serving.http) only once
its body has arrived in full, so clients that send their bodies slowly hold bytes of the body budget, never
places others could use. Whoever finds the queue full by then is answered 503 with Retry-After as well.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from polysense.errors import PolysenseError
from polysense.serving.handler import Unauthorized, failure_answer

if (
    TYPE_CHECKING
):  # the app that uses this middleware imports Starlette (polysense.serving.http), not this module
    from starlette.types import ASGIApp, Receive, Scope, Send

    from polysense.serving.service import Service

ADMITTED_PATHS = ("/v1/predict", "/v1/predict_batch")


class Admission:
    """Refuses prediction requests without the API key, and those that find `service`'s queue full."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ADMITTED_PATHS:
            await self.app(scope, receive, send)
            return
        service = self.service
        start = time.perf_counter()
        refusal: PolysenseError | None = None
        try:
            service.authorize(_headers(scope))
        except Unauthorized as error:
            refusal = error
        refusal = refusal or service.refusal()
        if refusal is not None:
            status = await _refuse(send, refusal)
            name = scope["path"].rsplit("/", 1)[-1]
            service.metrics.observe(name, status, time.perf_counter() - start, type(refusal).__name__)
            return
        await self.app(scope, receive, send)


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the one Authorization header is all that is read)."""
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in scope["headers"]
        if name == b"authorization"
    }


async def _refuse(send: Send, error: PolysenseError) -> int:
    status, answer, extra = failure_answer(error)
    body = json.dumps(answer).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status
