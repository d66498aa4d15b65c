"""Serving: continuous batching over a paged KV cache (:mod:`.engine`) behind an HTTP server (:mod:`.server`)."""

from jaxlm.serve.allocator import OutOfPages, PageAllocator
from jaxlm.serve.engine import Engine
from jaxlm.serve.sequence import Event
from jaxlm.serve.exporter import EngineCollector
from jaxlm.serve.metrics import EngineMetrics
from jaxlm.serve.request import Output, Request, RequestError, TokenLogprobs

__all__ = ["Engine", "EngineCollector", "EngineMetrics", "Event", "OutOfPages", "Output", "PageAllocator", "Request",
           "RequestError", "TokenLogprobs"]
