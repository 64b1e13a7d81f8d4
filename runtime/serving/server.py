"""Run the HTTP/WebSocket app on uvicorn, with graceful shutdown."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading

from polysense.errors import DependencyError
from polysense.inference.predictor import AnyPredictor
from polysense.serving.handler import ServeOptions

log = logging.getLogger("polysense.serve")

# On SIGTERM uvicorn stops accepting, lets in-flight requests finish, then shuts the app down (the batcher
# answers what is queued); past this many seconds it closes what is left.
GRACEFUL_SHUTDOWN_S = 8


def serve(
    pipeline: AnyPredictor,
    options: ServeOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: bool = False,
) -> None:
    """Serve `pipeline` until SIGINT/SIGTERM. Bound to loopback by default; anything else should carry an
    API key (ServeOptions.api_key) or sit behind a proxy that authenticates."""
    try:
        import uvicorn
    except ImportError as error:
        raise DependencyError(
            f"uvicorn is not installed ({error}); pip install 'polysense[serve]'"
        ) from error
    from polysense.serving.connections import uvicorn_limits
    from polysense.serving.http import create_app

    options = options or ServeOptions()
    if not _is_loopback(host) and options.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(pipeline, options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=access_log,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        log_level="info",
        **uvicorn_limits(options, app.state.service),  # admission at the head too
    )
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again so the process ends as if
    # killed by it. A requested stop that completed cleanly is a success: the re-raised signal meets a handler
    # that ignores it, and the process exits 0.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stopped(sig: int, frame: object) -> None:
    """What a stop signal does after uvicorn's graceful shutdown: nothing more."""


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
