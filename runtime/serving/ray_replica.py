"""One Ray Serve replica of `polysense serve --ray`: the same Starlette app that `polysense serve` runs on
uvicorn (polysense.serving.http.create_app), built inside the replica.

Ray Serve's ingress (`serve.ingress(app)`) takes any ASGI app and ships it to the replicas inside the
deployment. What polysense ships is a ReplicaApp: the bundle's path and the options, nothing more. Ray runs
the ASGI lifespan startup in each replica before it routes requests there; on that startup the ReplicaApp
loads the Pipeline, warms it up and builds the app, then hands it every request, HTTP and WebSocket alike.
So every endpoint, status code, JSON body and limit is the uvicorn server's, dynamic batching included;
each answer also names its replica in the X-Polysense-Replica header.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from polysense.errors import ConfigError
from polysense.serving.handler import ServeOptions, warm_up

if TYPE_CHECKING:  # the app this builds imports Starlette, in the replica (polysense.serving.http)
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("polysense.serve")
REPLICA_HEADER = "X-Polysense-Replica"


class ReplicaApp:
    """An ASGI app that builds polysense's app in the replica at lifespan startup, then forwards to it.

    Only the arguments travel from the driver (or `serve deploy`) to the replicas: the Pipeline is loaded by
    each replica, never pickled. An API key comes either with `options` (a local `--ray` run) or from the
    replica's environment variable `api_key_env` (a config file for `serve deploy`, which must not hold it).
    """

    def __init__(
        self,
        bundle: str,
        device: str = "auto",
        precision: str = "auto",
        threads: int = 1,
        options: dict[str, Any] | None = None,
        api_key_env: str | None = None,
    ) -> None:
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.threads = threads
        self.options = dict(options or {})
        self.api_key_env = api_key_env
        ServeOptions(**self.options)  # a bad option fails where the deployment is built, not in every replica
        self._app: ASGIApp | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_app": None}  # what a replica built stays in that replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is not None:
            await self._app(scope, receive, send)
            return
        if scope["type"] != "lifespan":
            raise RuntimeError("a request came before the lifespan startup that builds the app")
        startup = await receive()
        # A failure here (no bundle on this node, no API key) fails the lifespan startup: Ray logs it with its
        # traceback and marks the replica failed.
        replica = _replica_id()
        app = await asyncio.to_thread(self._build)
        self._app = _ReplicaHeader(app, replica)
        replayed = False

        async def receive_from_startup() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return startup
            return await receive()

        await self._app(scope, receive_from_startup, send)  # the app's own startup, then its shutdown

    def _build(self) -> ASGIApp:
        from polysense.inference.pipeline import Pipeline
        from polysense.serving.http import create_app

        options = ServeOptions(**self.options)
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(
                    f"${self.api_key_env} is not set on this node; the deployment needs the API key"
                )
            options = replace(options, api_key=key)
        pipeline = Pipeline.load(
            self.bundle, device=self.device, precision=self.precision, intra_op_threads=self.threads
        )
        log.info("warmed up in %.2f s", warm_up(pipeline))
        return create_app(pipeline, options, warmed_up=True)


class _ReplicaHeader:
    """Adds X-Polysense-Replica to every HTTP answer, refusals included."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


def _replica_id() -> str:
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)
