"""The state one server shares between its requests: pipeline, batchers, metrics, readiness, admission."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from polysense.errors import OverloadedError, RequestTimeoutError
from polysense.inference.fusion import Prediction
from polysense.inference.predictor import AnyPredictor
from polysense.serving.batcher import DynamicBatcher, ServiceTime
from polysense.serving.bodies import BodyBudget
from polysense.serving.handler import ClientGone, ServeOptions, authorize, warm_up
from polysense.serving.metrics import ServerMetrics
from polysense.serving.streams import StreamEncoder

if TYPE_CHECKING:  # Starlette and anyio are imported by the app that uses a Service, not here
    from anyio import CapacityLimiter
    from starlette.requests import Request

log = logging.getLogger("polysense.serve")
T = TypeVar("T")
# Below this many predictions in flight a request is never refused for its expected wait, whatever the model
# costs: normal concurrency (1-8 clients) is served as it always was, on a slow model too.
ADMIT_ALWAYS_BELOW = 8
# Nor unless the server is overloaded: in the last whole window of OVERLOAD_WINDOW_S (CoDel's interval),
# prediction requests arrived more than OVERLOAD_RATIO times as fast as admitted ones left (plus
# ADMIT_ALWAYS_BELOW, so a handful is never overload). Clients that wait for their answers (a closed loop)
# rarely outpace the server: on an idle machine 8-64 of them were served as before, a queue of 32 clients'
# 13-16 ms included; but in a window where a slowed server answers fewer requests than it has clients, their
# arrivals can exceed its departures by more than the slack (16 clients during a SIGTERM drain on a busy
# machine got 503s), which is why the rule is off by default. A burst into an idle server is served (the
# window before it was quiet). Under 4x overload
# requests arrive about 5 times as fast as they leave.
OVERLOAD_WINDOW_S = 0.1
OVERLOAD_RATIO = 1.5


@dataclass
class Overload:
    """Whether prediction requests arrive faster than the server answers them, judged on the last whole window
    (counted on the event loop only)."""

    window_s: float = OVERLOAD_WINDOW_S
    arrivals: int = 0  # in the current window: requests that reached admission with the API key
    departures: int = 0  # in the current window: admitted requests answered
    window_end: float = 0.0
    overloaded: bool = False  # in the last whole window

    def arrival(self, now: float) -> None:
        self._roll(now)
        self.arrivals += 1

    def departure(self, now: float) -> None:
        self._roll(now)
        self.departures += 1

    def now(self, now: float) -> bool:
        """Whether the server is overloaded at `now`."""
        self._roll(now)
        return self.overloaded

    def _roll(self, now: float) -> None:
        if now < self.window_end:
            return
        just_ended = now < self.window_end + self.window_s  # not a window followed by a quiet gap
        growth = self.arrivals - OVERLOAD_RATIO * self.departures
        self.overloaded = just_ended and growth > ADMIT_ALWAYS_BELOW
        self.arrivals = self.departures = 0
        self.window_end = now + self.window_s


class Service:
    """The state one server shares between requests: the pipeline, its batchers, metrics and readiness."""

    def __init__(self, pipeline: AnyPredictor, options: ServeOptions) -> None:
        self.pipeline = pipeline
        self.options = options
        self.metrics = ServerMetrics(queue_depth=lambda: self.batcher.queue_depth)
        self.batcher = DynamicBatcher(
            pipeline, options.batcher_options(), on_batch=self.metrics.batch_size.observe
        )
        self.streams = StreamEncoder() if "audio" in pipeline.modalities else None
        self.ready = threading.Event()
        self.inflight = 0  # places held: predictions admitted and not yet answered (on the event loop only)
        self.accepted = self.answered = 0  # prediction requests admitted / answered since the start
        # Prediction requests whose body has arrived in full on their connection and that are not answered yet,
        # admitted or not: counted by polysense.serving.connections (0 without it), so that admission at the
        # head counts the requests let through but not yet admitted by their ASGI task.
        self.arrived = 0
        # Seconds per sample while busy, from completions (the whole server's drain rate: event loop, preparation
        # and model runs together); admission refuses a request whose expected wait is over max_queue_delay_ms.
        self.service_time = ServiceTime()
        self.clock = time.perf_counter
        self._last_done = 0.0  # when the last admitted request left
        self.overload = Overload()
        self.bodies = BodyBudget(options.max_body_bytes, timeout_s=options.body_timeout_s)
        self.open_streams = 0
        # Preparation (decoding photos, resampling audio) runs on at most this many threads, so the memory of
        # decoding is bounded by it, not by the number of requests waiting.
        self.prepare_threads = max(2, os.cpu_count() or 2)
        self._limiter: CapacityLimiter | None = None

    def warm_up_in_background(self) -> None:
        def run() -> None:
            try:
                seconds = warm_up(self.pipeline)
            except Exception:  # the server stays up but never ready: /readyz tells the orchestrator
                log.exception("warm-up failed; the server will not become ready")
                return
            log.info("warmed up in %.2f s; ready", seconds)
            self.ready.set()

        threading.Thread(target=run, name="polysense-warm-up", daemon=True).start()

    def close(self) -> None:
        """After uvicorn stopped accepting and let in-flight requests finish: answer what is still queued and
        say whether every accepted request was answered."""
        self.batcher.close()
        if self.streams is not None:
            self.streams.close()
        unanswered = self.accepted - self.answered
        log.warning(
            "stopped: %d prediction requests accepted, %d answered%s",
            self.accepted,
            self.answered,
            "" if not unanswered else f", {unanswered} NOT answered",
        )

    async def in_thread(self, function: Callable[..., T], *args: object) -> T:
        import anyio

        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.prepare_threads)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)

    def authorize(self, headers: Mapping[str, str]) -> None:
        authorize(self.options.api_key, headers)

    def arrival(self) -> None:
        """A prediction request with the API key reached admission (once per request)."""
        self.overload.arrival(self.clock())

    def refusal(self, count: int = 1, ahead: int | None = None) -> OverloadedError | None:
        """Why `count` more predictions cannot be admitted now behind `ahead` in flight (default: those
        admitted), or None: the server is warming up, max_queue are in flight, or (with at least
        ADMIT_ALWAYS_BELOW in flight, while overloaded) the work ahead, in-flight samples x the measured
        seconds per sample, is over max_queue_delay_ms. Admission by expected wait keeps an admitted
        request's wait short under overload (one refused at once can retry or go to another replica); a queue
        bounded only in requests let admitted ones wait max_queue / throughput."""
        if not self.ready.is_set():
            return OverloadedError("the server is warming up; retry in a moment", retry_after_s=1.0)
        inflight = self.inflight if ahead is None else ahead
        if inflight + count > self.options.max_queue:
            return OverloadedError(
                f"{inflight} requests in flight, the limit is max_queue={self.options.max_queue}; retry shortly"
            )
        limit_ms = self.options.max_queue_delay_ms
        if limit_ms and inflight >= ADMIT_ALWAYS_BELOW and self.overload.now(self.clock()):
            wait_ms = self.service_time.wait_s(inflight) * 1000
            if wait_ms > limit_ms:
                return OverloadedError(
                    f"{inflight} requests in flight, about {wait_ms:.1f} ms of work ahead, over "
                    f"max_queue_delay_ms={limit_ms:g}; retry shortly"
                )
        return None

    @contextlib.asynccontextmanager
    async def admit(self, count: int = 1) -> AsyncIterator[None]:
        """Hold `count` places among the max_queue in flight for one request whose body has arrived in full
        (`count` samples of a predict_batch), or raise OverloadedError at once. The request counts as answered
        when it leaves with its prediction or its error, not when it is cancelled (a shutdown cut it off)."""
        refusal = self.refusal(count)
        if refusal is not None:
            raise refusal
        admitted = self.clock()
        self.inflight += count
        self.accepted += 1
        try:
            yield
        except Exception:
            self.answered += 1  # polysense.serving.http answers it with its error
            raise
        else:
            self.answered += 1
        finally:
            self.inflight -= count
            self._done(admitted, count)

    def arrive(self) -> None:
        """A prediction request let through at its head has its whole body (polysense.serving.connections):
        it counts in `arrived` until `leave`."""
        self.arrived += 1

    def leave(self) -> None:
        """A request counted by `arrive` was answered (or its connection lost)."""
        self.arrived -= 1

    def ahead(self) -> int:
        """Predictions in flight as admission at the head sees them: admitted, or, if more, arrived (a burst
        read in one turn of the event loop is all let through before any of its ASGI tasks admits it)."""
        return max(self.inflight, self.arrived)

    def _done(self, admitted: float, count: int) -> None:
        """A request of `count` samples admitted at `admitted` left: the server was busy on it from then, or
        from the last departure if that came later (a queue drains one departure after another), so that
        busy time over `count` is one observation of the seconds per sample."""
        now = self.clock()
        self.service_time.observe(now - max(admitted, self._last_done), count)
        self._last_done = now
        self.overload.departure(now)

    async def answer(
        self, future: Future[Prediction], request: Request, timeout: float | None = None
    ) -> Prediction:
        """The batcher's result for `future`, or ClientGone / RequestTimeoutError; a request given up on is
        cancelled, so the batcher drops it before it reaches the model."""
        answer = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(_disconnected(request))
        racing: set[asyncio.Future[Any]] = {answer, gone}  # a Prediction and None
        try:
            done, _ = await asyncio.wait(
                racing,
                timeout=self.options.timeout_s if timeout is None else timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
        if answer in done:
            return answer.result()
        answer.cancel()
        if gone in done:
            raise ClientGone
        raise RequestTimeoutError(
            f"no answer within timeout_s={self.options.timeout_s:g} s; the server is overloaded"
        )


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
