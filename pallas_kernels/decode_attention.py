"""Decode attention for GPUs: a few query tokens per sequence against a KV cache (flash-decoding).

Contract (the same as :func:`pallas_kernels.reference.decode_attention_reference`): each
sequence ``b`` has ``lengths[b]`` valid cache entries *after* this call's ``T`` tokens were
written, so query ``t`` sits at position ``lengths[b] - T + t`` and sees cache index ``s`` iff
``s <= lengths[b] - T + t``. A query that sees no entry (``lengths[b] - T + t < 0``, e.g. a
length-0 row) yields zeros, never NaN. Key blocks wholly past a sequence's length are never
read; entries past the length inside its last block are loaded and weighted by zero, so they
must be finite (stale or zero-initialised entries are).

Kernel layout. One program per (batch, kv head, split): split ``i`` owns cache indices
``[i * split_len, (i + 1) * split_len)`` and walks only the blocks of them below the sequence's
length. The ``G = H // K`` query heads of its kv head times the ``T`` query tokens form the rows
of one ``[G*T, head_dim]`` tile (padded to a power of two >= 16 for ``tl.dot``), so each block
of K and V is read from HBM once for the whole group, straight from the cache's stored
``[B, S, K, D]`` layout: the cache is never transposed, repeated or padded along S (a ragged
last block is a masked load). Each program keeps an online softmax in float32 and writes its
normalised partial output and log-sum-exp; a small JAX step combines the splits by log-sum-exp.
Only the query (``T*H*D`` values per sequence) is rearranged into that row layout.

Paged layout. With ``page_table_BxP`` (int32 ``[batch, pages_per_seq]``), the cache arguments
are page pools ``[num_pages, page_size, K, D]`` and logical cache index ``s`` of sequence ``b``
lives at ``pool[page_table[b, s // page_size], s % page_size]``; the kernel's key block is one
page (``page_size`` must be a power of two >= 16). Table entries past a sequence's length are
never read, so they may hold anything.

head_dim is padded to a power of two >= 16 like :mod:`pallas_kernels.flash_attention` does;
for the cache that padding is a copy per call, so models should use power-of-two head dims (the
kernel table gives paged calls of other head dims to XLA: the pool the model's layer loop hands
over holds every layer's pages, and padding it would copy them all on every layer).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import (
    _MIN_BLOCK,
    _is_power_of_two,
    _next_power_of_two,
    _pad_axis,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_step,
)
from pallas_kernels.triton_backend import plt

BLOCK_K = 64  # default key block (contiguous layout)
NUM_SPLITS = 8  # default number of programs the sequence is split over, per (batch, kv head)


@dataclasses.dataclass(frozen=True)
class _Config:
    sm_scale: float
    block_k: int  # keys per loop step (the page size when paged)
    split_len: int  # cache indices per split, a multiple of block_k
    kv_len: int  # logical cache capacity: S, or pages_per_seq * page_size
    paged: bool

    @property
    def mask_kv_tail(self) -> bool:  # the last block runs past the cache: load it masked
        return not self.paged and self.kv_len % self.block_k != 0


def _kernel(*refs, cfg: _Config):
    if cfg.paged:
        q_ref, k_ref, v_ref, pos_ref, pt_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, pos_ref, o_ref, lse_ref = refs
        pt_ref = None
    bk = cfg.block_k
    q = q_ref[...]  # [R, Dp]
    row_pos = pos_ref[...]  # [R] int32; padding rows hold -1
    length = jnp.max(row_pos) + 1  # entries the last query sees
    lo = pl.program_id(2) * cfg.split_len
    hi = jnp.minimum(jnp.minimum(lo + cfg.split_len, cfg.kv_len), length)
    # hi - lo >= -split_len, so the numerator is >= 0 and truncating division is a ceiling
    num_blocks = lax.div(jnp.maximum(hi - lo, 0) + (bk - 1), jnp.int32(bk))

    def load_block(j, ref, start):
        if cfg.paged:
            page = pt_ref[lax.div(start, jnp.int32(bk))]
            return ref[page, :, :]  # [page_size, Dp]
        rows = pl.ds(start, bk)
        if cfg.mask_kv_tail:
            idx = start + lax.broadcasted_iota(jnp.int32, (bk, ref.shape[-1]), 0)
            return plt.load(ref.at[rows, :], mask=idx < cfg.kv_len, other=0)
        return ref[rows, :]

    def body(j, carry):
        start = pl.multiple_of(lo + j * bk, bk)
        kv_idx = start + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        mask = kv_idx[None, :] <= row_pos[:, None]  # [R, bk]
        if cfg.mask_kv_tail:
            mask = mask & (kv_idx < cfg.kv_len)[None, :]
        k, v = load_block(j, k_ref, start), load_block(j, v_ref, start)
        return online_softmax_step(carry, q, k, v, mask, cfg.sm_scale)

    carry = lax.fori_loop(0, num_blocks, body, online_softmax_init(*q_ref.shape))
    o_ref[...], lse_ref[...] = online_softmax_finish(*carry)  # nothing seen: output 0 and lse ~ mask value


def _combine(o_BxKxNxRxD: jax.Array, lse_BxKxNxR: jax.Array) -> jax.Array:
    """Merge the splits' normalised partial outputs by their log-sum-exp (float32)."""
    if o_BxKxNxRxD.shape[2] == 1:
        return o_BxKxNxRxD[:, :, 0]
    m = jnp.max(lse_BxKxNxR, axis=2, keepdims=True)
    w = jnp.exp(lse_BxKxNxR - m)  # the largest is exp(0) = 1, so the sum below is >= 1
    return jnp.sum(w[..., None] * o_BxKxNxRxD, axis=2) / jnp.sum(w, axis=2)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_k", "num_splits", "interpret"))
def decode_attention(
    q_BxTxHxD: jax.Array,
    k_cache_BxSxKxD: jax.Array,
    v_cache_BxSxKxD: jax.Array,
    lengths_B: jax.Array,
    *,
    page_table_BxP: jax.Array | None = None,
    sm_scale: float | None = None,
    block_k: int = BLOCK_K,
    num_splits: int = NUM_SPLITS,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query attention of ``T`` new tokens over a KV cache; ``[B, T, H, D]`` in q's dtype.

    ``k_cache``/``v_cache``: ``[B, S, K, D]``, or page pools ``[num_pages, page_size, K, D]``
    when ``page_table_BxP`` (int32 ``[B, pages_per_seq]``) is given. ``lengths_B`` (int):
    valid entries per sequence including this call's tokens, at most the cache capacity.
    ``block_k``: keys per step (contiguous layout; a power of two >= 16, shrunk for short caches;
    the page size replaces it when paged). ``num_splits``: programs per (sequence, kv head)
    the cache is divided over (fewer when the cache is short). ``interpret=True`` runs the
    kernel in the Pallas interpreter (any backend).
    """
    B, T, H, D = q_BxTxHxD.shape
    K = k_cache_BxSxKxD.shape[2]
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if k_cache_BxSxKxD.shape != v_cache_BxSxKxD.shape or k_cache_BxSxKxD.shape[3] != D:
        raise ValueError(f"k cache {k_cache_BxSxKxD.shape} and v cache {v_cache_BxSxKxD.shape} do not match q {q_BxTxHxD.shape}")
    if not (q_BxTxHxD.dtype == k_cache_BxSxKxD.dtype == v_cache_BxSxKxD.dtype):
        raise ValueError("q and the k/v caches must share one dtype; cast q to the cache dtype")
    if lengths_B.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {lengths_B.shape}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    G = H // K
    paged = page_table_BxP is not None
    if paged:
        page_size = k_cache_BxSxKxD.shape[1]
        if page_table_BxP.ndim != 2 or page_table_BxP.shape[0] != B:
            raise ValueError(f"page table must be [batch={B}, pages_per_seq], got {page_table_BxP.shape}")
        if not (_is_power_of_two(page_size) and page_size >= _MIN_BLOCK):
            raise ValueError(f"page_size must be a power of two >= {_MIN_BLOCK} (Triton tiles), got {page_size}")
        bk, kv_len = page_size, page_table_BxP.shape[1] * page_size
    else:
        if k_cache_BxSxKxD.shape[0] != B:
            raise ValueError(f"k cache batch {k_cache_BxSxKxD.shape[0]} does not match q batch {B}")
        if not (_is_power_of_two(block_k) and block_k >= _MIN_BLOCK):
            raise ValueError(f"block_k must be a power of two >= {_MIN_BLOCK} (Triton tiles), got {block_k}")
        kv_len = k_cache_BxSxKxD.shape[1]
        bk = min(block_k, max(_MIN_BLOCK, _next_power_of_two(kv_len)))
    split_len = pl.cdiv(pl.cdiv(kv_len, num_splits), bk) * bk
    splits = pl.cdiv(kv_len, split_len)
    scale = D**-0.5 if sm_scale is None else float(sm_scale)

    R = max(_MIN_BLOCK, _next_power_of_two(T * G))  # rows of the tile: (token, head in group)
    Dp = max(_MIN_BLOCK, _next_power_of_two(D))
    q_BxKxRxD = q_BxTxHxD.reshape(B, T, K, G, D).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, D)
    q_BxKxRxD = _pad_axis(_pad_axis(q_BxKxRxD, 2, R), 3, Dp)
    k = _pad_axis(k_cache_BxSxKxD, 3, Dp)
    v = _pad_axis(v_cache_BxSxKxD, 3, Dp)
    row_t = jnp.arange(T * G, dtype=jnp.int32) // G
    pos_BxR = lengths_B.astype(jnp.int32)[:, None] - T + row_t[None, :]
    pos_BxR = _pad_axis(pos_BxR, 1, R, -1)  # padding rows see nothing

    cfg = _Config(sm_scale=scale, block_k=bk, split_len=split_len, kv_len=kv_len, paged=paged)
    if paged:
        num_pages = k.shape[0]
        kv_spec = pl.BlockSpec((num_pages, bk, None, Dp), lambda b, h, i: (0, 0, h, 0))
        extra_args = [page_table_BxP.astype(jnp.int32)]
        extra_specs = [pl.BlockSpec((None, page_table_BxP.shape[1]), lambda b, h, i: (b, 0))]
    else:
        kv_spec = pl.BlockSpec((None, kv_len, None, Dp), lambda b, h, i: (b, 0, h, 0))
        extra_args, extra_specs = [], []
    o, lse = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(B, K, splits),
        in_specs=[
            pl.BlockSpec((None, None, R, Dp), lambda b, h, i: (b, h, 0, 0)),  # q rows
            kv_spec,  # k
            kv_spec,  # v
            pl.BlockSpec((None, R), lambda b, h, i: (b, 0)),  # row positions
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, R, Dp), lambda b, h, i: (b, h, i, 0, 0)),
            pl.BlockSpec((None, None, None, R), lambda b, h, i: (b, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, splits, R, Dp), jnp.float32),
            jax.ShapeDtypeStruct((B, K, splits, R), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="decode_attention_paged" if paged else "decode_attention",
    )(q_BxKxRxD, k, v, pos_BxR, *extra_args)
    out_BxKxRxD = _combine(o, lse)[:, :, : T * G, :D]
    out = out_BxKxRxD.reshape(B, K, T, G, D).transpose(0, 2, 1, 3, 4).reshape(B, T, H, D)
    return out.astype(q_BxTxHxD.dtype)
