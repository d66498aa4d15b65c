"""Prefix caching: content hashes of full KV pages, and a host-memory tier for evicted pages.

A full page's hash chains the hash of everything before it with the page's own token ids and the
engine's ``extra_key`` (whatever else changes the keys and values: model id, adapter id):

    h_0 = sha256(b"jaxlm-kv" | extra_key),   h_{i+1} = sha256(h_i | token ids of page i as int64)

so equal hashes mean equal tokens at equal positions under equal weights, i.e. equal KV. The
same scheme as vLLM's v1 prefix caching (``hash_block_tokens(parent_hash, block_tokens,
extra_keys)``), with a cryptographic hash so that a collision is not a practical concern.

:class:`HostTier` keeps copies of evicted pages in host memory (arrays ``[layers, page_size,
kv_heads, head_dim]`` in jax's ``pinned_host`` memory kind, so a GPU copies them by DMA), at most
``capacity`` pages, least recently used dropped first. :func:`gather_pages` / :func:`scatter_pages`
cut pages out of the device pools and write them back, compiled once for a fixed number of pages
per call (unused slots name the scratch page); :func:`to_host` / :func:`to_device` move them.
"""

from __future__ import annotations

import collections
import functools
import hashlib
from typing import Sequence

import jax
import numpy as np

ROOT_TAG = b"jaxlm-kv"


def root_hash(extra_key: str = "") -> bytes:
    """The hash every chain starts from: distinct ``extra_key`` (model, adapter) -> disjoint caches."""
    return hashlib.sha256(ROOT_TAG + extra_key.encode()).digest()


def page_hashes(token_ids: Sequence[int], page_size: int, extra_key: str = "", known: Sequence[bytes] = ()) -> list[bytes]:
    """Hashes of every full page of ``token_ids`` (``len // page_size`` of them), chained from
    :func:`root_hash`. ``known``: hashes of the first pages already computed for these tokens
    (reused, not recomputed)."""
    out = list(known[: len(token_ids) // page_size])
    parent = out[-1] if out else root_hash(extra_key)
    for i in range(len(out), len(token_ids) // page_size):
        page = np.asarray(token_ids[i * page_size:(i + 1) * page_size], np.int64)
        parent = hashlib.sha256(parent + page.tobytes()).digest()
        out.append(parent)
    return out


class HostTier:
    """Copies of evicted KV pages in host memory, by page hash; at most ``capacity`` pages (LRU)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"host tier capacity must be >= 0 pages, got {capacity}")
        self.capacity = capacity
        self._pages: collections.OrderedDict[bytes, tuple[jax.Array, jax.Array]] = collections.OrderedDict()
        self.stored = 0  # pages copied in
        self.dropped = 0  # pages dropped to make room

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, page_hash: bytes) -> bool:
        return page_hash in self._pages

    def put(self, page_hash: bytes, k: jax.Array, v: jax.Array) -> None:
        """Keep one page's keys and values ``[layers, page_size, kv_heads, head_dim]`` (a no-op at capacity 0)."""
        if not self.capacity:
            return
        if page_hash in self._pages:
            self._pages.move_to_end(page_hash)
            return
        self._pages[page_hash] = (k, v)
        self.stored += 1
        while len(self._pages) > self.capacity:
            self._pages.popitem(last=False)
            self.dropped += 1

    def get(self, page_hash: bytes) -> tuple[jax.Array, jax.Array]:
        """A kept page's (k, v); it becomes the most recently used. KeyError if not kept."""
        self._pages.move_to_end(page_hash)
        return self._pages[page_hash]


@jax.jit
def gather_pages(k_pool, v_pool, pages_W):
    """Pages ``pages_W`` (int32 ``[W]``) of both pools, one array ``[layers, page_size, kv_heads,
    head_dim]`` per page: two tuples of ``W``."""
    W = pages_W.shape[0]
    return tuple(k_pool[:, pages_W[j]] for j in range(W)), tuple(v_pool[:, pages_W[j]] for j in range(W))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def scatter_pages(k_pool, v_pool, pages_W, k_pages, v_pages):
    """The pools with pages ``pages_W`` overwritten by the tuples of ``W`` pages ``k_pages``,
    ``v_pages`` (slots naming the scratch page write there)."""
    k, v = jax.numpy.stack(k_pages, 1), jax.numpy.stack(v_pages, 1)
    return k_pool.at[:, pages_W].set(k.astype(k_pool.dtype)), v_pool.at[:, pages_W].set(v.astype(v_pool.dtype))


def to_host(x: jax.Array) -> jax.Array:
    """A copy of ``x`` in pinned host memory (same sharding otherwise): a DMA on GPUs; on CPU the
    same RAM under another memory kind."""
    return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))


def to_device(x: jax.Array) -> jax.Array:
    """A copy of a host-memory array back in device memory (same sharding otherwise)."""
    return jax.device_put(x, x.sharding.with_memory_kind("device"))


def _padded(pages: Sequence[int], width: int) -> jax.Array:
    idx = np.full((width,), 0, np.int32)  # unused slots name the scratch page (0)
    idx[: len(pages)] = pages
    return jax.numpy.asarray(idx)


def copy_to_host(k_pool: jax.Array, v_pool: jax.Array, pages: Sequence[int], hashes: Sequence[bytes], host: HostTier,
                 width: int) -> None:
    """Keep pages ``pages`` of the pools in ``host`` under ``hashes`` (``width`` pages per copy call);
    pages already kept only become the most recently used."""
    for h in hashes:
        if h in host:
            host.get(h)
    todo = [(p, h) for p, h in zip(pages, hashes) if h not in host]
    for at in range(0, len(todo), width):
        part = todo[at:at + width]
        ks, vs = gather_pages(k_pool, v_pool, _padded([p for p, _ in part], width))
        for (_, h), k, v in zip(part, ks, vs):
            host.put(h, to_host(k), to_host(v))


def copy_from_host(k_pool: jax.Array, v_pool: jax.Array, pages: Sequence[int], ks: Sequence[jax.Array],
                   vs: Sequence[jax.Array], width: int) -> tuple[jax.Array, jax.Array]:
    """The pools (donated) with host pages ``ks``/``vs`` written into ``pages``, ``width`` per call."""
    for at in range(0, len(pages), width):
        part = pages[at:at + width]
        k = [to_device(x) for x in ks[at:at + width]]
        v = [to_device(x) for x in vs[at:at + width]]
        pad = width - len(part)  # the scratch page's slots get copies of the first page
        k_pool, v_pool = scatter_pages(k_pool, v_pool, _padded(part, width), tuple(k + k[:1] * pad),
                                       tuple(v + v[:1] * pad))
    return k_pool, v_pool


def compile_page_copies(k_pool: jax.Array, v_pool: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Compile both copies by copying the scratch page through host memory onto itself; the pools (donated)."""
    ks, vs = gather_pages(k_pool, v_pool, _padded([], width))
    return copy_from_host(k_pool, v_pool, [0], [to_host(ks[0])], [to_host(vs[0])], width)
