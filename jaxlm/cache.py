"""The KV cache in two layouts the model serves through the same call (the cache's type decides).

* :class:`KVCache` - contiguous ``[layers, batch, max_len, kv_heads, head_dim]`` keys and values.
* :class:`PagedKVCache` - page pools ``[layers, num_pages, page_size, kv_heads, head_dim]`` shared
  by all sequences, plus a page table ``[batch, pages_per_seq]`` per call: position ``p`` of row
  ``b`` lives at ``pool[page_table[b, p // page_size], p % page_size]``. Pages are handed out by
  the serving engine (:mod:`jaxlm.serve`); page 0 is its scratch page, where table entries of
  unallocated pages point, so writes past a sequence's pages never touch another sequence.

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

    def layer_stack(self) -> tuple[jax.Array, jax.Array]:
        """(k, v) stacked over layers: the model's layer loop takes and returns one layer of each."""
        return self.k_LxBxSxKxD, self.v_LxBxSxKxD

    def with_layers(self, kv: tuple[jax.Array, jax.Array]) -> KVCache:
        return KVCache(*kv)


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


# Pages are shared by every sequence (not split by batch), and the model's layer loop carries the
# pools of all layers whole (PagedKVCache.flat_pools): not split by layer (pipeline stage) either.
PAGED_CACHE_AXES = (None, None, None, "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Page pools ``[L, num_pages, page_size, K, D]`` and the page table ``[batch, pages_per_seq]`` int32.

    Table entries must be pages in ``[0, num_pages)`` (the engine's allocated pages, or its scratch
    page 0): a layer reaches its pages at ``layer * num_pages + entry`` of the flattened pools, so an
    entry out of range would address another layer's page.
    """

    k_LxNxPxKxD: jax.Array
    v_LxNxPxKxD: jax.Array
    page_table_BxP: jax.Array

    @property
    def page_size(self) -> int:
        return self.k_LxNxPxKxD.shape[2]

    @property
    def max_len(self) -> int:
        return self.page_table_BxP.shape[1] * self.page_size

    @property
    def num_pages(self) -> int:
        return self.k_LxNxPxKxD.shape[1]

    def flat_pools(self) -> tuple[jax.Array, jax.Array]:
        """The k and v pools as one pool of every layer's pages ``[layers * num_pages, page_size, K, D]``
        (a free reshape): page ``n`` of layer ``i`` is page ``i * num_pages + n``.

        The model carries these through its layer loop whole and each layer reads and writes its
        pages in place through :meth:`layer_table`. Slicing a layer's pool out and stacking the
        layers back (a scan's inputs and outputs) would copy the whole pool on every call, a cost
        that grows with the pool rather than with the tokens the call touches.
        """
        return tuple(p.reshape(-1, *p.shape[2:]) for p in (self.k_LxNxPxKxD, self.v_LxNxPxKxD))

    def layer_table(self, layer: jax.Array | int) -> jax.Array:
        """Layer ``layer``'s page table into :meth:`flat_pools` ``[batch, pages_per_seq]`` int32."""
        return self.page_table_BxP + layer * self.num_pages

    def with_flat_pools(self, k_flat: jax.Array, v_flat: jax.Array) -> PagedKVCache:
        """This cache with its pools replaced by flat pools as :meth:`flat_pools` returns them."""
        shape = self.k_LxNxPxKxD.shape
        return PagedKVCache(k_flat.reshape(shape), v_flat.reshape(shape), self.page_table_BxP)


def init_paged_pools(cfg: ModelConfig, num_pages: int, page_size: int, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Empty k and v page pools ``[layers, num_pages, page_size, kv_heads, head_dim]``."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def write_paged(pool_NxPxKxD: jax.Array, new_BxTxKxD: jax.Array, positions_BxT: jax.Array, page_table_BxP: jax.Array) -> jax.Array:
    """Write token ``(b, t)`` at position ``positions[b, t]`` through row ``b`` of the page table.

    Positions past the table's capacity go to page 0 of ``pool_NxPxKxD`` (the engine's scratch page;
    with the model's flattened pools, layer 0's scratch page for every layer: never read unmasked).
    """
    page_size = pool_NxPxKxD.shape[1]
    B, T = positions_BxT.shape
    slot_BxT = positions_BxT // page_size
    inside = slot_BxT < page_table_BxP.shape[1]
    page_BxT = jnp.take_along_axis(page_table_BxP, jnp.where(inside, slot_BxT, 0), axis=1)
    page_BxT = jnp.where(inside, page_BxT, 0)
    new = new_BxTxKxD.reshape(B * T, *new_BxTxKxD.shape[2:]).astype(pool_NxPxKxD.dtype)
    return pool_NxPxKxD.at[page_BxT.reshape(-1), (positions_BxT % page_size).reshape(-1)].set(new)


def update(cache_layer: jax.Array, new_BxTxKxD: jax.Array, positions_BxT: jax.Array, page_table_BxP: jax.Array | None) -> jax.Array:
    """One layer's k or v cache with this call's tokens written (contiguous or paged)."""
    if page_table_BxP is None:
        return write(cache_layer, new_BxTxKxD, positions_BxT[:, 0])
    return write_paged(cache_layer, new_BxTxKxD, positions_BxT, page_table_BxP)
