"""Cost model of serving steps: FLOPs and bytes of a model call, and host load versus recompute.

Counts are the model's own (what a perfect kernel must do), not what padding makes the compiled
program do. With ``N`` the matmul parameters (:func:`jaxlm.metrics.count_params` without the
embedding lookup, with the output head), ``L`` layers, ``H`` query heads of ``D`` dims:

* FLOPs of a token at position ``p`` (0-based): ``2 N + 4 L H D (p + 1)`` (the projections, then
  scores and values over ``p + 1`` keys; Kaplan et al. 2020, "Scaling laws", table 1).
* Bytes of a call: the weights once (``N`` in the compute dtype), every row's keys and values read
  (``(p + 1)`` tokens' worth at its last query) and its new tokens' written.
* A page of ``page_size`` tokens comes back from host memory in ``page_size * kv_bytes_per_token /
  host_link_bytes_per_s`` seconds, or is recomputed in ``prefill_flops / matmul_flops_per_s``;
  :func:`load_beats_recompute` picks the cheaper (docs/serving.md tabulates which wins).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from jaxlm.config import ModelConfig
from jaxlm.generate import kv_bytes_per_token
from jaxlm.metrics import count_params, peak_flops

# Host <-> device bandwidth per direction, bytes/s, by device kind (first match wins). PCIe Gen5 x16
# (H100/H200 SXM): 64 GB/s raw, ~55 GB/s achieved for pinned copies; PCIe Gen4 x16 (A100): ~25 GB/s.
HOST_LINK_BYTES_PER_S = {"GH200": 450e9, "H200": 55e9, "H100": 55e9, "A100": 25e9}
# A CPU "device": the copy is a memcpy inside host memory (a few GB/s on one loaded core), and the
# matmul rate is that of a few loaded cores. Rough figures; pass measured ones to the engine.
CPU_HOST_LINK_BYTES_PER_S = 5e9
CPU_MATMUL_FLOPS_PER_S = 20e9


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters multiplied per token: all but the embedding lookup, the (tied) output head included."""
    _, body = count_params(cfg)
    return body + (cfg.embed_dim * cfg.vocab_size if cfg.tie_embeddings else 0)


def prefill_flops(cfg: ModelConfig, start: int, end: int) -> float:
    """FLOPs to compute the tokens at positions ``start .. end - 1`` given the keys/values before ``start``."""
    n = end - start
    attended = (end * (end + 1) - start * (start + 1)) // 2  # sum of (p + 1) over the positions
    return 2.0 * matmul_params(cfg) * n + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended


def call_flops_and_bytes(cfg: ModelConfig, rows: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(FLOPs, bytes moved) of one model call over ``rows`` of ``(start position, tokens fed)``."""
    if not rows:
        return 0.0, 0.0
    kv = kv_bytes_per_token(cfg)
    flops = sum(prefill_flops(cfg, s, s + n) for s, n in rows)
    weights = matmul_params(cfg) * jnp.dtype(cfg.compute_dtype).itemsize
    moved = weights + sum((s + n) * kv + n * kv for s, n in rows)
    return flops, float(moved)


def device_rates(device_kind: str, platform: str, dtype: str) -> tuple[float, float]:
    """(host link bytes/s, matmul FLOP/s) assumed for a device: GPU peaks from the targets table,
    else the rough CPU figures above."""
    if platform == "gpu":
        link = next((bw for name, bw in HOST_LINK_BYTES_PER_S.items() if name in device_kind.upper()), 25e9)
        return link, peak_flops(device_kind, dtype) or 100e12
    return CPU_HOST_LINK_BYTES_PER_S, CPU_MATMUL_FLOPS_PER_S


def load_seconds(cfg: ModelConfig, tokens: int, host_link_bytes_per_s: float) -> float:
    """Seconds to bring ``tokens`` tokens' keys and values back over the host link."""
    return tokens * kv_bytes_per_token(cfg) / host_link_bytes_per_s


def recompute_seconds(cfg: ModelConfig, start: int, end: int, matmul_flops_per_s: float) -> float:
    """Seconds to prefill positions ``start .. end - 1`` again at the matmul rate."""
    return prefill_flops(cfg, start, end) / matmul_flops_per_s


def load_beats_recompute(cfg: ModelConfig, start: int, end: int, host_link_bytes_per_s: float,
                         matmul_flops_per_s: float) -> bool:
    """True when loading positions ``start .. end - 1`` from host memory is faster than recomputing them."""
    return load_seconds(cfg, end - start, host_link_bytes_per_s) < recompute_seconds(cfg, start, end, matmul_flops_per_s)
