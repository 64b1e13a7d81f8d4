"""Prometheus metrics of one server, in a registry of its own (two servers in one process never mix)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from polysense.errors import DependencyError

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def import_prometheus():
    try:
        import prometheus_client
    except ImportError as error:
        raise DependencyError(
            f"prometheus-client is not installed ({error}); install the server with pip install 'polysense[serve]'"
        ) from error
    return prometheus_client


class ServerMetrics:
    """requests and errors by type, request latency, batch sizes, queue depth and live streams."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        prometheus = import_prometheus()
        self._prometheus = prometheus
        self.registry = prometheus.CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = prometheus.Counter(
            "polysense_requests_total",
            "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "code"],
            **kw,
        )
        self.errors = prometheus.Counter(
            "polysense_errors_total", "Requests that failed, by error type.", ["type"], **kw
        )
        self.latency = prometheus.Histogram(
            "polysense_request_seconds",
            "Time from request to answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.batch_size = prometheus.Histogram(
            "polysense_batch_size",
            "Requests per model run of the dynamic batcher.",
            buckets=BATCH_BUCKETS,
            **kw,
        )
        self.queue = prometheus.Gauge("polysense_queue_depth", "Requests waiting for a model run.", **kw)
        self.queue.set_function(queue_depth)
        self.streams = prometheus.Gauge("polysense_streams_active", "Open WebSocket audio streams.", **kw)
        self._cache: dict[tuple[str, int, str | None], tuple[Any, Any, Any]] = {}

    def observe(self, endpoint: str, code: int, seconds: float, error: str | None = None) -> None:
        requests, latency, errors = self._children(endpoint, code, error)
        requests.inc()
        latency.observe(seconds)
        if errors is not None:
            errors.inc()

    def _children(self, endpoint: str, code: int, error: str | None) -> tuple[Any, Any, Any]:
        """The labelled series one answer updates, looked up once per (endpoint, code, error): under overload
        every refusal is observed, and the lookups cost as much as the updates (endpoints, codes and error
        types are few, so the cache stays small)."""
        key = (endpoint, code, error)
        children = self._cache.get(key)
        if children is None:
            errors = None if error is None else self.errors.labels(error)
            children = (self.requests.labels(endpoint, str(code)), self.latency.labels(endpoint), errors)
            self._cache[key] = children
        return children

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        return self._prometheus.generate_latest(self.registry), self._prometheus.CONTENT_TYPE_LATEST
