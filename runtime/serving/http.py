"""`polysense serve`: a Pipeline behind HTTP and WebSocket (Starlette on uvicorn), with dynamic batching.

    POST /v1/predict        JSON {"text", "image" (base64), "audio" (base64), "sample_rate", "voice"} or multipart
    POST /v1/predict_batch  JSON {"samples": [...]}: one answer per sample, a bad sample fails only itself
    GET  /v1/info           labels, modalities, precisions, providers
    WS   /v1/stream         live PCM audio in, partial and final predictions out (polysense.serving.websocket)
    GET  /healthz  /readyz  /metrics

Requests are admitted while fewer than max_queue are in flight and their bodies fit a byte budget; beyond
that they are answered 503 with Retry-After at once. A request takes its place among the max_queue only once
its body has arrived in full (a slow body holds body bytes, never a place). Each admitted request is prepared
(decoded, tokenized) and then waits for the dynamic batcher; a caller that hangs up is dropped from the queue.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future

from polysense.errors import DependencyError, PolysenseError
from polysense.inference.fusion import Prediction
from polysense.inference.predictor import AnyPredictor

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute
except ImportError as error:
    raise DependencyError(
        f"the server's packages are missing ({error}); pip install 'polysense[serve]'"
    ) from error

from polysense.serving.admission import Admission
from polysense.serving.bodies import content_type, read_sample
from polysense.serving.handler import (
    INTERNAL_ERROR,
    ClientGone,
    ServeOptions,
    UnsupportedMediaType,
    error_json,
    failure_answer,
    info_json,
    parse_json,
    prediction_json,
    sample_from_json,
    samples_from_batch_json,
)
from polysense.serving.service import Service
from polysense.serving.websocket import stream

log = logging.getLogger("polysense.serve")
Handler = Callable[[Request], Awaitable[Response]]


def create_app(
    pipeline: AnyPredictor, options: ServeOptions | None = None, warmed_up: bool = False
) -> Starlette:
    """The ASGI application serving `pipeline` (a polysense.Pipeline or Ensemble): uvicorn runs it
    (polysense.serving.server), and so does every Ray Serve replica (polysense.serving.ray_replica).
    Readiness comes after a warm-up run in the background, or at startup when the caller has `warmed_up`
    the pipeline already (a Ray replica does, before Ray routes requests to it)."""
    service = Service(pipeline, options or ServeOptions())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if warmed_up:
            service.ready.set()
        else:
            service.warm_up_in_background()
        try:
            yield
        finally:
            service.close()  # after uvicorn let in-flight requests finish: answers what is still queued

    routes = [
        Route("/v1/predict", _endpoint("predict", _predict), methods=["POST"]),
        Route("/v1/predict_batch", _endpoint("predict_batch", _predict_batch), methods=["POST"]),
        Route("/v1/info", _endpoint("info", _info), methods=["GET"]),
        Route("/healthz", _endpoint("healthz", _healthz, protected=False), methods=["GET"]),
        Route("/readyz", _endpoint("readyz", _readyz, protected=False), methods=["GET"]),
        Route("/metrics", _endpoint("metrics", _metrics), methods=["GET"]),
        WebSocketRoute("/v1/stream", stream),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(Admission, service=service)],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.service = service
    return app


async def _http_error(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (404 no such path, 405 wrong method) as JSON, like every other answer."""
    assert isinstance(error, HTTPException)
    kind = {404: "NotFound", 405: "MethodNotAllowed"}.get(error.status_code, "HTTPError")
    message = {
        404: f"no such path {request.url.path!r}; the paths are listed in docs/reference/http-api.md",
        405: f"{request.method} is not allowed on {request.url.path}; use {(error.headers or {}).get('Allow', '')}",
    }.get(error.status_code, error.detail)
    return JSONResponse({"error": message, "type": kind}, error.status_code, headers=error.headers)


def _failure(error: BaseException) -> Response:
    status, body, headers = failure_answer(error)
    return JSONResponse(body, status, headers=headers)


def _endpoint(name: str, handler: Handler, protected: bool = True) -> Handler:
    """The handler with authorization, errors as JSON answers (never a traceback), and metrics."""

    async def run(request: Request) -> Response:
        service: Service = request.app.state.service
        start = time.perf_counter()
        error_type = None
        try:
            if protected:
                service.authorize(request.headers)
            response = await handler(request)
        except ClientGone:  # nothing goes back: no one is listening (499 is for the metrics)
            response, error_type = Response(status_code=499), "ClientGone"
            log.info("%s: the client hung up before its answer", name)
        except Exception as error:
            response, error_type = _failure(error), type(error).__name__
            if response.status_code == 500:  # the answer says "see the server log": so it must be there
                log.error("%s failed", name, exc_info=error)
        finally:
            service.bodies.release(request)
        service.metrics.observe(name, response.status_code, time.perf_counter() - start, error_type)
        return response

    return run


async def _predict(request: Request) -> Response:
    service: Service = request.app.state.service
    sample = await read_sample(
        request, service.bodies, service.in_thread
    )  # authorized already (admission.py)
    async with service.admit():  # a place in the queue once the body is here, not while it arrives
        if "image" in sample or "audio" in sample:
            future = await service.in_thread(service.batcher.submit, sample)
        else:  # tokenizing a text (cut to max_length first) costs less than the hop to a thread
            future = service.batcher.submit(sample)
        prediction = await service.answer(future, request)
    return JSONResponse(prediction_json(prediction))


async def _predict_batch(request: Request) -> Response:
    service: Service = request.app.state.service
    if content_type(request) != "application/json":
        raise UnsupportedMediaType('predict_batch reads application/json {"samples": [...]}')
    body = await service.bodies.read(request)
    raw = await service.in_thread(
        lambda: samples_from_batch_json(parse_json(body), service.options.max_batch_samples)
    )
    async with service.admit(len(raw)):  # one place per sample, once the body is here

        def submit_all() -> list[Future[Prediction] | PolysenseError]:
            submitted: list[Future[Prediction] | PolysenseError] = []
            for index, item in enumerate(raw):
                try:
                    submitted.append(service.batcher.submit(sample_from_json(item, f"sample {index}: ")))
                except PolysenseError as error:
                    submitted.append(error)
                except Exception as error:  # a decoder's own failure: this sample's answer, not the batch's
                    log.error("predict_batch: sample %d failed in preparation", index, exc_info=error)
                    submitted.append(_Internal())
            return submitted

        submitted = await service.in_thread(submit_all)
        deadline = time.monotonic() + service.options.timeout_s  # one timeout for the whole request
        answers = []
        try:
            for item in submitted:
                answers.append(await _answer_one(service, item, request, deadline))
        finally:  # the caller hung up or the time ran out: what is still queued is dropped, not run
            for item in submitted:
                if not isinstance(item, PolysenseError):
                    item.cancel()
    return JSONResponse({"predictions": answers})


class _Internal(PolysenseError):
    """A sample of a predict_batch that failed for a reason polysense did not raise on purpose (logged)."""


async def _answer_one(
    service: Service, item: Future[Prediction] | PolysenseError, request: Request, deadline: float
) -> dict:
    """One sample's answer in a predict_batch: its prediction, or its error (never its batch mates')."""
    try:
        if isinstance(item, _Internal):
            return INTERNAL_ERROR
        if isinstance(item, PolysenseError):
            raise item
        return prediction_json(await service.answer(item, request, max(0.0, deadline - time.monotonic())))
    except PolysenseError as error:
        return error_json(error)
    except ClientGone:
        raise
    except Exception:  # an unexpected failure of one sample's model run: its batch mates still answer
        log.exception("predict_batch: one sample failed")
        return INTERNAL_ERROR


async def _info(request: Request) -> Response:
    service: Service = request.app.state.service
    return JSONResponse(info_json(service.pipeline, service.options))


async def _healthz(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def _readyz(request: Request) -> Response:
    if request.app.state.service.ready.is_set():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "warming up"}, 503, headers={"Retry-After": "1"})


async def _metrics(request: Request) -> Response:
    body, kind = request.app.state.service.metrics.exposition()
    return Response(body, headers={"Content-Type": kind})
