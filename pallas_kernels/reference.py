"""Pure-JAX reference attention: the ground truth every kernel is tested against.

Masking is by positions, which serves training, packed documents, prefill and cached decoding
with one rule: query ``t`` may see key ``s`` iff ``kv_pos[s] <= q_pos[t]`` and, when segment ids
are given, both belong to the same segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: a fully masked row gives no NaN


def attention_reference(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    q_positions_BxT: jax.Array,
    kv_positions_BxS: jax.Array,
    q_segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Grouped-query causal attention; returns ``[batch, q_len, heads, head_dim]`` in q's dtype.

    ``K`` kv heads serve ``H = K * G`` query heads (head ``h`` reads kv head ``h // G``); K and V
    are never repeated in memory. Logits, softmax and the normaliser are float32.
    """
    B, T, H, D = q_BxTxHxD.shape
    _, S, K, _ = k_BxSxKxD.shape
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    G = H // K
    scale = D**-0.5 if sm_scale is None else sm_scale
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, G, D)
    logits_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    mask_BxTxS = kv_positions_BxS[:, None, :] <= q_positions_BxT[:, :, None]
    if q_segment_ids_BxT is not None:
        kv_seg = q_segment_ids_BxT if kv_segment_ids_BxS is None else kv_segment_ids_BxS
        mask_BxTxS &= q_segment_ids_BxT[:, :, None] == kv_seg[:, None, :]
    logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, _MASK_VALUE)
    probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
    out_BxTxKxGxD = jnp.einsum(
        "bkgts,bskd->btkgd", probs.astype(v_BxSxKxD.dtype), v_BxSxKxD, preferred_element_type=jnp.float32
    )
    return out_BxTxKxGxD.reshape(B, T, H, D).astype(q_BxTxHxD.dtype)


def gather_pages(pool_NxPxKxD: jax.Array, page_table_BxP: jax.Array) -> jax.Array:
    """Page pool ``[num_pages, page_size, K, D]`` -> each row's cache ``[batch, pages_per_seq * page_size, K, D]``."""
    B, P = page_table_BxP.shape
    return pool_NxPxKxD[page_table_BxP].reshape(B, P * pool_NxPxKxD.shape[1], *pool_NxPxKxD.shape[2:])


def decode_attention_reference(
    q_BxTxHxD: jax.Array,
    k_cache_BxSxKxD: jax.Array,
    v_cache_BxSxKxD: jax.Array,
    lengths_B: jax.Array,
    *,
    page_table_BxP: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """Attention of ``T`` new tokens over a KV cache; returns ``[batch, T, heads, head_dim]``.

    ``lengths_B`` counts each sequence's valid cache entries including this call's tokens, so
    query ``t`` sits at position ``lengths - T + t`` and sees cache index ``s <= lengths - T + t``.
    A query that sees nothing yields zeros. With ``page_table_BxP`` (``[batch, pages_per_seq]``)
    the caches are page pools ``[num_pages, page_size, K, D]`` and index ``s`` lives at
    ``pool[page_table[b, s // page_size], s % page_size]``.
    """
    if page_table_BxP is not None:
        k_cache_BxSxKxD = gather_pages(k_cache_BxSxKxD, page_table_BxP)
        v_cache_BxSxKxD = gather_pages(v_cache_BxSxKxD, page_table_BxP)
    B, T = q_BxTxHxD.shape[:2]
    S = k_cache_BxSxKxD.shape[1]
    q_pos_BxT = lengths_B.astype(jnp.int32)[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]
    kv_pos_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    out = attention_reference(
        q_BxTxHxD, k_cache_BxSxKxD, v_cache_BxSxKxD,
        q_positions_BxT=q_pos_BxT, kv_positions_BxS=kv_pos_BxS, sm_scale=sm_scale,
    )
    return jnp.where((q_pos_BxT >= 0)[:, :, None, None], out, jnp.zeros((), out.dtype))
