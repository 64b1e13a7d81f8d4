"""Per-connection limits uvicorn does not have: a cap on request heads in bytes and in time, and on open
connections.

uvicorn (with httptools, what `polysense[serve]` installs) bounds neither the size of a request's head nor the
time a client may take to send it, and keeps a connection that never sends a byte open forever: one client
streaming an endless header value held the event loop (every other request timed out), and 3,000 silent
connections held 3,000 file descriptors. `guarded_protocol` is uvicorn's own httptools protocol with three
checks added where the bytes arrive:

- a connection's request head (request line and headers) must arrive within header_timeout_s, counted from
  the connection's opening or, on a kept-alive connection, from the next request's first byte: beyond, 408 and
  the connection closed (a connection that sent nothing is closed without an answer);
- a head over max_header_bytes gets 431 and the connection closed, before the parser has seen more;
- beyond max_connections open connections (WebSocket streams included) a new one is closed at once.

What uvicorn does bound is set on its Config (polysense.serving.server): idle kept-alive connections
(timeout_keep_alive), WebSocket message size and pings. Bodies are bounded in time by the app
(polysense.serving.bodies), which knows which request a slow body holds back.

The protocol also admits prediction requests (polysense.serving.admission), as soon as a head is parsed: 401
without the API key, then 503 with Retry-After while the queue is full, written from here with no ASGI task,
routing or body parse. Under 4x overload a refusal that went through the app cost about as much as an answer,
so the server fell behind reading its sockets and every request, accepted ones included, waited there about
100 ms before admission saw it; refused here, a refusal costs a few microseconds and admission bounds the wait.
The refused request's body bytes are read and dropped by the parser; if they are all here the connection is
kept alive, otherwise it is closed after the answer (nothing more is read for a refused request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from polysense.errors import PolysenseError
from polysense.serving.admission import ADMITTED_AT_HEAD, ADMITTED_PATHS, refusal_of
from polysense.serving.handler import ServeOptions, failure_answer, status_of

if TYPE_CHECKING:
    from polysense.serving.service import Service

log = logging.getLogger("polysense.serve")
ADMITTED_TARGETS = frozenset(path.encode() for path in ADMITTED_PATHS)


def _answer(
    status: int, body: dict, headers: dict[str, str] | None = None, keep_alive: bool = False
) -> bytes:
    """A whole HTTP/1.1 answer with a JSON body, ready to write to the transport."""
    payload = json.dumps(body).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(payload)}",
    ]
    lines += [f"{name.lower()}: {value}" for name, value in (headers or {}).items()]
    if not keep_alive:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


# Refusals' answers by (error type, message, Retry-After, keep-alive): under overload most messages repeat (one per number
# in flight), and building an answer cost as much as the rest of a refusal's Python. Cleared when full.
_ANSWERS: dict[tuple[type, str, object, bool], bytes] = {}
MAX_CACHED_ANSWERS = 1024


def refusal_answer(error: PolysenseError, keep_alive: bool) -> bytes:
    """The answer the app would give to a request refused with `error` (401 or 503 with Retry-After)."""
    key = (type(error), str(error), getattr(error, "retry_after_s", None), keep_alive)
    answer = _ANSWERS.get(key)
    if answer is None:
        if len(_ANSWERS) >= MAX_CACHED_ANSWERS:
            _ANSWERS.clear()
        status, body, headers = failure_answer(error)
        answer = _ANSWERS[key] = _answer(status, body, headers, keep_alive)
    return answer


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head-size, head-time and connection limits (set by guarded_protocol)."""

    options: ClassVar[ServeOptions]
    service: ClassVar[Service | None]  # admits prediction requests at their head; None: the app alone does
    too_large: ClassVar[bytes]  # the answers, made once
    too_slow: ClassVar[bytes]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_bytes = 0
        self.reading_head = True
        self.head_timer: asyncio.TimerHandle | None = None
        # The request refused at its head whose body is still being dropped, and whether the connection
        # stays open after its answer.
        self.refused: PolysenseError | None = None
        self.refused_keep_alive = False
        # This connection's prediction request let through at its head (`let_through`) and, once its body is
        # here, counted in Service.arrived until it is answered (`counted`).
        self.let_through = self.counted = False
        if len(self.connections) > self.options.max_connections:
            log.warning("refused a connection: max_connections=%d are open", self.options.max_connections)
            transport.close()
            return
        self.head_timer = self.loop.call_later(self.options.header_timeout_s, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
        self.uncount()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.reading_head:
            self.head_bytes += len(data)
            if self.head_timer is None:  # a kept-alive connection's next request
                self.head_timer = self.loop.call_later(self.options.header_timeout_s, self.head_timed_out)
        super().data_received(data)
        # a head still incomplete after this many bytes: refused before the parser is fed any more
        if self.reading_head and self.head_bytes > self.options.max_header_bytes:
            self.refuse(self.too_large)
        # a refused request's body not all here: answered now, and the connection closed rather than read on
        if self.refused is not None:
            error, self.refused = self.refused, None
            self.refuse(refusal_answer(error, keep_alive=False))

    def on_headers_complete(self) -> None:
        self.reading_head = False
        self.stop_head_timer()
        if not self.refused_at_head():
            super().on_headers_complete()

    def refused_at_head(self) -> bool:
        """Whether this head is a prediction request that admission refuses (401, then 503): if so it gets no
        ASGI task; its answer goes out once its body has been dropped (on_message_complete)."""
        service = self.service
        if service is None or not self.admitted_here():
            return False
        start = time.perf_counter()
        error = refusal_of(service, self.headers, service.ahead())
        if error is None:
            self.let_through = True
            self.scope[ADMITTED_AT_HEAD] = True  # type: ignore[literal-required]  # the app admits it no more
            return False
        self.refused = error
        self.refused_keep_alive = self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
        endpoint = self.url.partition(b"?")[0].rsplit(b"/", 1)[-1].decode()
        service.metrics.observe(endpoint, status_of(error), time.perf_counter() - start, type(error).__name__)
        return True

    def admitted_here(self) -> bool:
        """A POST to a prediction path with no earlier request on this connection still unanswered (a
        pipelined one is left to the app, which answers in order) and no protocol upgrade."""
        return (
            self.parser.get_method() == b"POST"
            and self.url.partition(b"?")[0] in ADMITTED_TARGETS
            and (self.cycle is None or self.cycle.response_complete)
            and not self.parser.should_upgrade()
        )

    def on_body(self, body: bytes) -> None:
        if self.refused is None:  # a refused request's body is dropped as it arrives
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refused is None:
            super().on_message_complete()
            self.count()
            return
        error, self.refused = self.refused, None
        self.transport.write(refusal_answer(error, self.refused_keep_alive))
        if self.refused_keep_alive:
            self.on_response_complete()  # ready for the next request, as after any answer
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        self.reading_head, self.head_bytes = True, 0
        self.uncount()
        super().on_response_complete()

    def count(self) -> None:
        """The request let through at its head has its body: counted in Service.arrived until answered."""
        if self.let_through and self.service is not None and not self.cycle.response_complete:
            self.service.arrive()
            self.counted = True
        self.let_through = False

    def uncount(self) -> None:
        self.let_through = False
        if self.counted and self.service is not None:
            self.service.leave()
            self.counted = False

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.reading_head:  # a connection that sent nothing is closed without an answer
            self.refuse(self.too_slow if self.head_bytes else b"")

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def refuse(self, answer: bytes) -> None:
        self.reading_head = False
        self.stop_head_timer()
        if not self.transport.is_closing():
            if answer:
                self.transport.write(answer)
            self.transport.close()


def guarded_protocol(options: ServeOptions, service: Service | None = None) -> type[asyncio.Protocol]:
    """GuardedProtocol with `options`' limits, admitting prediction requests for `service` (None: the app
    does): the class uvicorn.Config(http=...) instantiates per connection."""
    too_large = _answer(
        431,
        {
            "error": f"the request line and headers are over this server's limit of {options.max_header_bytes:,} "
            f"bytes (polysense serve --max-header-kb {options.max_header_bytes >> 10})",
            "type": "HeadersTooLarge",
        },
    )
    too_slow = _answer(
        408,
        {
            "error": f"the request's headers did not arrive within {options.header_timeout_s:g} s "
            "(polysense serve --header-timeout-s)",
            "type": "HeaderTimeout",
        },
    )
    attributes = {"options": options, "service": service, "too_large": too_large, "too_slow": too_slow}
    return type("GuardedProtocol", (GuardedProtocol,), attributes)


def uvicorn_limits(options: ServeOptions, service: Service | None = None) -> dict[str, Any]:
    """uvicorn.Config's own settings for `options`' per-connection limits (and admission for `service`)."""
    return {
        "http": guarded_protocol(options, service),
        "timeout_keep_alive": options.idle_timeout_s,
        "ws_max_size": options.max_body_bytes,
        "h11_max_incomplete_event_size": options.max_header_bytes,  # used only if uvicorn runs h11
        "backlog": min(2048, options.max_connections),
    }
