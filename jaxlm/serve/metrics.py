"""Serving load metrics, and the kinds and help texts of their Prometheus names (:mod:`.exporter`).

The engine records events here (tokens computed, first tokens, preemptions); gauges (KV-cache
use, batch size, queue length) are read from the engine when a snapshot is taken. Rates are
over a sliding window; latency quantiles over the most recent samples.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

WINDOW_S = 30.0  # tokens/s are averaged over this much recent time
SAMPLES = 2048  # latency quantiles use this many recent samples


class _Rate:
    def __init__(self, clock):
        self._clock = clock
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._start = clock()

    def add(self, n: int) -> None:
        self._events.append((self._clock(), n))

    def per_second(self) -> float:
        now = self._clock()
        while self._events and self._events[0][0] < now - WINDOW_S:
            self._events.popleft()
        span = min(WINDOW_S, now - self._start)
        return sum(n for _, n in self._events) / span if span > 0 else 0.0


class EngineMetrics:
    """Counters, rates and latency samples of one engine (thread-safe to read while it runs)."""

    def __init__(self, clock=time.perf_counter):
        self._lock = threading.Lock()
        self.prefill_tokens = 0  # prompt tokens computed (recomputation included)
        self.decode_tokens = 0  # tokens generated
        self.preemptions = 0
        self.recomputed_tokens = 0  # cached tokens thrown away by preemption (computed again later)
        self.requests_finished = 0
        self._prefill_rate = _Rate(clock)
        self._decode_rate = _Rate(clock)
        self.ttft_s: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self.itl_s: collections.deque[float] = collections.deque(maxlen=SAMPLES)

    def record_prefill(self, n: int) -> None:
        with self._lock:
            self.prefill_tokens += n
            self._prefill_rate.add(n)

    def record_decode(self, n: int) -> None:
        with self._lock:
            self.decode_tokens += n
            self._decode_rate.add(n)

    def record_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_s.append(seconds)

    def record_inter_token(self, seconds: float) -> None:
        with self._lock:
            self.itl_s.append(seconds)

    def record_preemption(self, lost_tokens: int) -> None:
        with self._lock:
            self.preemptions += 1
            self.recomputed_tokens += lost_tokens

    def record_finished(self) -> None:
        with self._lock:
            self.requests_finished += 1

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            ttft, itl = np.asarray(self.ttft_s), np.asarray(self.itl_s)
            out = {
                "prefill_tokens_total": self.prefill_tokens,
                "decode_tokens_total": self.decode_tokens,
                "preemptions_total": self.preemptions,
                "recomputed_tokens_total": self.recomputed_tokens,
                "requests_finished_total": self.requests_finished,
                "prefill_tokens_per_second": self._prefill_rate.per_second(),
                "decode_tokens_per_second": self._decode_rate.per_second(),
            }
            for name, xs in (("time_to_first_token_seconds", ttft), ("inter_token_latency_seconds", itl)):
                for q in (0.5, 0.99):
                    out[f"{name}_p{round(q * 100)}"] = float(np.quantile(xs, q)) if len(xs) else 0.0
                out[f"{name}_count"] = len(xs)
                out[f"{name}_sum"] = float(xs.sum())
            return out


_HELP = {
    "kv_cache_usage_ratio": ("gauge", "KV-cache pages in use / pages that can be handed out"),
    "kv_cache_pages_used": ("gauge", "KV-cache pages in use"),
    "kv_cache_pages_total": ("gauge", "KV-cache pages that can be handed out"),
    "running_requests": ("gauge", "requests in the running batch (prefilling or decoding)"),
    "waiting_requests": ("gauge", "requests queued for admission (new or preempted)"),
    "prefill_tokens_per_second": ("gauge", f"prompt tokens computed per second over the last {WINDOW_S:.0f} s"),
    "decode_tokens_per_second": ("gauge", f"tokens generated per second over the last {WINDOW_S:.0f} s"),
    "prefill_tokens_total": ("counter", "prompt tokens computed, recomputation included"),
    "decode_tokens_total": ("counter", "tokens generated"),
    "preemptions_total": ("counter", "requests preempted when KV-cache pages ran out"),
    "recomputed_tokens_total": ("counter", "cached tokens dropped by preemption, to be computed again"),
    "requests_finished_total": ("counter", "requests finished"),
}
_SUMMARIES = {
    "time_to_first_token_seconds": "time from arrival to the first generated token",
    "inter_token_latency_seconds": "time between consecutive tokens of one request",
}

