"""The KV cache: contiguous ``[layers, batch, max_len, kv_heads, head_dim]`` keys and values.

A sequence's token at position ``p`` lives at index ``p``. Each model call writes its tokens at
``positions[:, 0] ...`` (the tokens of one call are consecutive), so prefill and decode are the
same write. Slots past a sequence's current position may hold stale values; attention never
reads them because it masks keys by position (``kv_pos <= q_pos``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.config import ModelConfig

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k_LxBxSxKxD: jax.Array
    v_LxBxSxKxD: jax.Array

    @property
    def max_len(self) -> int:
        return self.k_LxBxSxKxD.shape[2]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache in ``dtype`` (default: the compute dtype)."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write(cache_BxSxKxD: jax.Array, new_BxTxKxD: jax.Array, start_B: jax.Array) -> jax.Array:
    """Write each sequence's ``T`` new entries at its own start index."""

    def one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))

    return jax.vmap(one)(cache_BxSxKxD, new_BxTxKxD, start_B)
