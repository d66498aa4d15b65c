"""Serving load metrics, and the kinds and help texts of their Prometheus names (:mod:`.exporter`).

The engine records events here (tokens computed, first tokens, preemptions, prefix-cache lookups,
pages copied back from host memory, and per step its batch size, KV-cache use and arithmetic
intensity); gauges (KV-cache use, pages cached and on host, batch size, queue length) are read
from the engine when a snapshot is taken. Rates are
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
        self.recomputed_tokens = 0  # tokens computed again after a preemption (not found in the cache)
        self.prefix_queries = 0  # tokens looked up in the prefix cache (each admission: prompt + generated)
        self.prefix_hits = 0  # of those, tokens reused (in the pool or copied back from host memory)
        self.prefix_host_hits = 0  # of those, tokens copied back from host memory
        self.host_loads = 0  # pages copied from host memory into the pool
        self.steps: collections.deque[tuple[int, float, float, float]] = collections.deque(maxlen=SAMPLES)
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

    def record_preemption(self) -> None:
        with self._lock:
            self.preemptions += 1

    def record_prefix_lookup(self, queried: int, reused: int, from_host: int, recomputed: int) -> None:
        """An admission: ``queried`` tokens looked up, ``reused`` found (``from_host`` of them in host
        memory), ``recomputed`` tokens it had computed before a preemption and must compute again."""
        with self._lock:
            self.prefix_queries += queried
            self.prefix_hits += reused
            self.prefix_host_hits += from_host
            self.recomputed_tokens += recomputed

    def record_host_load(self, pages: int) -> None:
        with self._lock:
            self.host_loads += pages

    def record_step(self, batch: int, kv_usage: float, flops: float, bytes_moved: float) -> None:
        """One engine step: sequences computed, KV pages in use / capacity, model FLOPs and bytes moved."""
        with self._lock:
            self.steps.append((batch, kv_usage, flops, bytes_moved))

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
                "prefix_cache_queries_total": self.prefix_queries,
                "prefix_cache_hits_total": self.prefix_hits,
                "prefix_cache_host_hits_total": self.prefix_host_hits,
                "prefix_cache_hit_rate": self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0,
                "kv_host_loaded_pages_total": self.host_loads,
                "requests_finished_total": self.requests_finished,
                "prefill_tokens_per_second": self._prefill_rate.per_second(),
                "decode_tokens_per_second": self._decode_rate.per_second(),
            }
            batch, usage, flops, moved = (np.asarray(c, np.float64) for c in zip(*self.steps)) if self.steps else ((),) * 4
            last = self.steps[-1] if self.steps else (0, 0.0, 0.0, 0.0)
            out.update({
                "step_batch_size": last[0], "step_kv_cache_usage_ratio": last[1],
                "step_arithmetic_intensity": last[2] / last[3] if last[3] else 0.0,
                "step_batch_size_mean": float(np.mean(batch)) if len(batch) else 0.0,
                "step_arithmetic_intensity_mean": float(np.sum(flops) / np.sum(moved)) if len(moved) else 0.0,
            })
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
    "recomputed_tokens_total": ("counter", "tokens computed again after a preemption (not found in the prefix cache)"),
    "kv_cache_pages_cached": ("gauge", "KV-cache pages no request holds, kept for the prefix cache (evictable)"),
    "kv_cache_evictions_total": ("counter", "cached KV-cache pages evicted (least recently used) to make room"),
    "kv_host_pages": ("gauge", "KV pages kept in host memory"),
    "kv_host_pages_total": ("gauge", "KV pages host memory may keep (--host-kv-gib)"),
    "kv_host_stored_pages_total": ("counter", "evicted KV pages copied to host memory"),
    "kv_host_dropped_pages_total": ("counter", "KV pages dropped from host memory (least recently used)"),
    "kv_host_loaded_pages_total": ("counter", "KV pages copied back from host memory instead of recomputed"),
    "prefix_cache_queries_total": ("counter", "tokens looked up in the prefix cache (prompt + generated, per admission)"),
    "prefix_cache_hits_total": ("counter", "tokens reused from the prefix cache (not computed)"),
    "prefix_cache_host_hits_total": ("counter", "tokens reused from the host-memory tier"),
    "prefix_cache_hit_rate": ("gauge", "prefix-cache hits / queries, in tokens, since start"),
    "step_batch_size": ("gauge", "sequences computed by the last engine step (prefill + decode)"),
    "step_kv_cache_usage_ratio": ("gauge", "KV-cache pages in use / total after the last engine step"),
    "step_arithmetic_intensity": ("gauge", "model FLOPs / bytes moved (weights + KV) of the last engine step"),
    "step_batch_size_mean": ("gauge", f"mean sequences per engine step over the last {SAMPLES} steps"),
    "step_arithmetic_intensity_mean": ("gauge", f"FLOPs / bytes moved over the last {SAMPLES} engine steps"),
    "requests_finished_total": ("counter", "requests finished"),
}
_SUMMARIES = {
    "time_to_first_token_seconds": "time from arrival to the first generated token",
    "inter_token_latency_seconds": "time between consecutive tokens of one request",
}

