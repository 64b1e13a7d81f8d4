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
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from polysense.serving.handler import ServeOptions

log = logging.getLogger("polysense.serve")


def _answer(status: int, reason: str, kind: str, message: str) -> bytes:
    body = json.dumps({"error": message, "type": kind}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head-size, head-time and connection limits (set by guarded_protocol)."""

    options: ClassVar[ServeOptions]
    too_large: ClassVar[bytes]  # the answers, made once
    too_slow: ClassVar[bytes]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_bytes = 0
        self.reading_head = True
        self.head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.options.max_connections:
            log.warning("refused a connection: max_connections=%d are open", self.options.max_connections)
            transport.close()
            return
        self.head_timer = self.loop.call_later(self.options.header_timeout_s, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_head_timer()
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

    def on_headers_complete(self) -> None:
        self.reading_head = False
        self.stop_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        self.reading_head, self.head_bytes = True, 0
        super().on_response_complete()

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


def guarded_protocol(options: ServeOptions) -> type[asyncio.Protocol]:
    """GuardedProtocol with `options`' limits: the class uvicorn.Config(http=...) instantiates per connection."""
    too_large = _answer(
        431,
        "Request Header Fields Too Large",
        "HeadersTooLarge",
        f"the request line and headers are over max_header_bytes={options.max_header_bytes:,}",
    )
    too_slow = _answer(
        408,
        "Request Timeout",
        "HeaderTimeout",
        f"the request's headers did not arrive within header_timeout_s={options.header_timeout_s:g} s",
    )
    attributes = {"options": options, "too_large": too_large, "too_slow": too_slow}
    return type("GuardedProtocol", (GuardedProtocol,), attributes)


def uvicorn_limits(options: ServeOptions) -> dict[str, Any]:
    """uvicorn.Config's own settings for `options`' per-connection limits."""
    return {
        "http": guarded_protocol(options),
        "timeout_keep_alive": options.idle_timeout_s,
        "ws_max_size": options.max_body_bytes,
        "h11_max_incomplete_event_size": options.max_header_bytes,  # used only if uvicorn runs h11
        "backlog": min(2048, options.max_connections),
    }
