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
