"""One Ray Serve replica of `polysense serve --ray` (polysense.serving.ray_app deploys it): the Pipeline
loaded and warmed up once, requests answered by path with the Starlette server's JSON and HTTP statuses
(polysense.serving.handler), model runs batched by Ray's own `@serve.batch`.

A request is checked and prepared (decoded, tokenized) on its own, so a bad input fails only itself; the
prepared samples of concurrent requests then share model runs, one per modality subset. Multipart bodies,
the /v1/stream WebSocket and /metrics are not served here (Ray exports its own Serve metrics).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import Any

from polysense.errors import ConfigError, PolysenseError, RequestTimeoutError
from polysense.inference.fusion import Prediction, Prepared
from polysense.serving.batcher import predict_each, with_own_preprocessing
from polysense.serving.bodies import BodyBudget, content_type
from polysense.serving.handler import (
    INTERNAL_ERROR,
    ServeOptions,
    UnsupportedMediaType,
    authorize,
    error_json,
    failure_answer,
    info_json,
    parse_json,
    prediction_json,
    sample_from_json,
    samples_from_batch_json,
    warm_up,
)

log = logging.getLogger("polysense.serve")
REPLICA_HEADER = "X-Polysense-Replica"


class NotFound(PolysenseError):
    """A path this deployment does not serve."""


class MethodNotAllowed(NotFound):
    """A path served, asked with another method."""


ROUTES = {  # path -> (method, handler, needs the API key)
    "/v1/predict": ("POST", "_predict", True),
    "/v1/predict_batch": ("POST", "_predict_batch", True),
    "/v1/info": ("GET", "_info", True),
    "/healthz": ("GET", "_alive", False),
    "/readyz": ("GET", "_ready", False),
}


class PolysenseDeployment:
    """One Ray Serve replica: the Pipeline loaded and warmed up once, requests answered by path."""

    def __init__(
        self,
        bundle: str,
        device: str = "auto",
        precision: str = "auto",
        threads: int = 1,
        options: dict | None = None,
        api_key_env: str | None = None,
    ) -> None:
        from ray import serve

        from polysense.inference.pipeline import Pipeline

        self.options = ServeOptions(**(options or {}))
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ConfigError(f"${api_key_env} is not set on this node; the deployment needs the API key")
            self.options = replace(self.options, api_key=key)
        self.pipeline = Pipeline.load(bundle, device=device, precision=precision, intra_op_threads=threads)
        log.info("warmed up in %.2f s", warm_up(self.pipeline))
        self.bodies = BodyBudget(self.options.max_body_bytes)
        self.replica = serve.get_replica_context().replica_id.unique_id
        batch = serve.batch(
            max_batch_size=self.options.max_batch, batch_wait_timeout_s=self.options.max_wait_ms / 1000
        )
        self._batched = batch(self._run_batch)

    async def __call__(self, request: Any) -> Any:
        try:
            response = await self._route(request)
        except Exception as error:
            if not isinstance(error, PolysenseError):
                log.exception("%s failed", request.url.path)
            response = _failure(error)
        response.headers[REPLICA_HEADER] = self.replica
        return response

    async def _route(self, request: Any) -> Any:
        path = request.url.path
        root = request.scope.get("root_path", "").rstrip("/")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path not in ROUTES:
            raise NotFound(f"no endpoint {path}; see /v1/predict, /v1/predict_batch, /v1/info, /healthz")
        method, handler, protected = ROUTES[path]
        if request.method != method:
            raise MethodNotAllowed(f"{path} takes {method}, not {request.method}")
        if protected:
            authorize(self.options.api_key, request.headers)
        return await getattr(self, handler)(request)

    async def _json_body(self, request: Any) -> Any:
        if content_type(request) != "application/json":
            raise UnsupportedMediaType(
                "send application/json (image and audio as base64); multipart is not served on Ray"
            )
        return parse_json(await self.bodies.read(request))

    async def _answer(self, sample: dict) -> Prediction:
        """Prepare one sample (a bad one fails here, alone), then wait for its batched model run."""
        if "image" in sample or "audio" in sample:
            prepared = await asyncio.to_thread(self.pipeline.prepare, sample)
        else:  # tokenizing a text costs less than the hop to a thread
            prepared = self.pipeline.prepare(sample)
        try:
            result = await asyncio.wait_for(self._batched(prepared), self.options.timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"no answer within timeout_s={self.options.timeout_s:g} s; the deployment is overloaded"
            ) from None
        if isinstance(result, BaseException):
            raise result
        return with_own_preprocessing(result, prepared)

    async def _run_batch(self, batch: list[Prepared]) -> list[Prediction | Exception]:
        return await asyncio.to_thread(predict_each, self.pipeline, batch)

    async def _predict(self, request: Any) -> Any:
        prediction = await self._answer(sample_from_json(await self._json_body(request)))
        return _json(prediction_json(prediction))

    async def _predict_batch(self, request: Any) -> Any:
        raw = samples_from_batch_json(await self._json_body(request), self.options.max_batch_samples)

        async def one(index: int, item: Any) -> dict:
            try:
                return prediction_json(await self._answer(sample_from_json(item, f"sample {index}: ")))
            except PolysenseError as error:
                return error_json(error)
            except Exception:
                log.exception("predict_batch: sample %d failed", index)
                return INTERNAL_ERROR

        return _json({"predictions": await asyncio.gather(*(one(i, item) for i, item in enumerate(raw)))})

    async def _info(self, request: Any) -> Any:
        return _json({**info_json(self.pipeline, self.options), "replica": self.replica})

    async def _alive(self, request: Any) -> Any:
        return _json({"status": "alive"})

    async def _ready(self, request: Any) -> Any:  # Ray routes to a replica only once it has warmed up
        return _json({"status": "ready"})


def _json(content: Any, status: int = 200, headers: dict | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(content, status, headers=headers)


def _failure(error: BaseException) -> Any:
    if isinstance(error, NotFound):
        return _json(error_json(error), 405 if isinstance(error, MethodNotAllowed) else 404)
    status, body, headers = failure_answer(error)
    return _json(body, status, headers)
