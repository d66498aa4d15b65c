"""Serving: continuous batching over a paged KV cache (:mod:`.engine`) behind an HTTP server (:mod:`.server`)."""

from jaxlm.serve.allocator import OutOfPages, PageAllocator
from jaxlm.serve.engine import Engine, Event
from jaxlm.serve.metrics import EngineMetrics, prometheus_text
from jaxlm.serve.request import Output, Request, RequestError

__all__ = ["Engine", "EngineMetrics", "Event", "OutOfPages", "Output", "PageAllocator", "Request", "RequestError", "prometheus_text"]
