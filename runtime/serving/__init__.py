"""Serving: a dynamic batcher (no HTTP needed), live audio streams batched across connections, and
`polysense serve` (HTTP + WebSocket on Starlette/uvicorn, or Ray Serve to scale out). The HTTP parts import
their packages only when used: pip install 'polysense[serve]' (and 'ray[serve]' for Ray)."""

from polysense.serving.batcher import BatcherOptions, BatcherStats, DynamicBatcher
from polysense.serving.handler import ServeOptions
from polysense.serving.streams import StreamEncoder

__all__ = ["BatcherOptions", "BatcherStats", "DynamicBatcher", "ServeOptions", "StreamEncoder"]
