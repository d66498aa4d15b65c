"""Context parallelism: attention when the sequence is split over the ``sequence`` mesh axis.

Between layers a sequence-sharded activation needs nothing special (norms, projections and the
MLP act on tokens independently); only attention mixes tokens across shards. Two strategies,
chosen by ``model.context_impl``, both run under ``jax.shard_map`` with the same logical specs as
everything else (batch over the data axes, sequence over ``sequence``, heads over ``tensor``):

* ``all_gather`` - gather the keys and values (with their positions and segment ids) of the whole
  sequence onto every shard, then run the local attention kernel (the Pallas flash kernel or the
  XLA reference) on the shard's queries. Simple, uses the kernel as is; K/V memory grows with
  the full sequence (the query side and the activations stay split).
* ``ring``       - keep K/V split; pass blocks around the ring with ``ppermute`` while each shard
  folds one block at a time into its queries' output with a log-sum-exp (online softmax)
  combine. Memory per shard stays ``1/n`` of the sequence; the block math is the XLA path.

Masking is by positions, and positions travel with their tokens, so causal load balancing is a
pure reordering of the tokens: :func:`load_balance_order` deals the sequence out in ``2n``
chunks so shard ``i`` holds chunks ``i`` and ``2n-1-i`` and every shard sees about the same
number of visible (query, key) pairs. The data pipeline applies it (``jaxlm.data``); the loss is a
mean over tokens, so the order does not change it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sharding.rules import LOGICAL_RULES, logical_spec, per_shard

CONTEXT_IMPLS = ("all_gather", "ring")
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf in the combine

LocalAttention = Callable[..., jax.Array]  # (q, k, v, q_pos, kv_pos, q_seg, kv_seg) -> out


def sequence_axis() -> str:
    """The mesh axis the ``seq`` logical axis maps to."""
    axis = LOGICAL_RULES["seq"]
    assert isinstance(axis, str), "context parallelism expects 'seq' to map to a single mesh axis"
    return axis


def sequence_shards(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> int:
    """How many ways the sequence is split on ``mesh`` (1 when the axis is absent)."""
    return 1 if mesh.empty else dict(mesh.shape).get(sequence_axis(), 1)


def load_balance_order(seq_len: int, shards: int) -> np.ndarray:
    """Token order ``[seq_len]`` that balances causal work over ``shards`` sequence shards.

    The sequence is cut into ``2 * shards`` equal chunks; shard ``i`` gets chunks ``i`` and
    ``2 * shards - 1 - i`` (one early, one late), so each shard has the same visible area.
    """
    if shards == 1:
        return np.arange(seq_len)
    if seq_len % (2 * shards):
        raise ValueError(f"sequence length {seq_len} must be a multiple of 2 * {shards} sequence shards")
    chunks = np.arange(seq_len).reshape(2 * shards, -1)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * shards - 1 - i]]) for i in range(shards)])


def block_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_pos_BxT, kv_pos_BxS, q_seg_BxT, kv_seg_BxS, scale: float):
    """One block of grouped-query attention with its log-sum-exp, all in float32.

    Returns ``(out [B, T, H, D] float32, normalised over this block, lse [B, T, H] float32)``.
    A row that sees no key in the block gets a very negative (finite) lse, so it drops out of
    the combine.
    """
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxSxKxD.shape[2]
    G = H // K
    logits = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxHxD.reshape(B, T, K, G, D), k_BxSxKxD, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    mask_BxTxS = kv_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None]
    if q_seg_BxT is not None:
        mask_BxTxS &= q_seg_BxT[:, :, None] == kv_seg_BxS[:, None, :]
    logits = jnp.where(mask_BxTxS[:, None, None], logits, _MASK_VALUE)
    m = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - m[..., None])
    denom = jnp.sum(p, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v_BxSxKxD.dtype), v_BxSxKxD, preferred_element_type=jnp.float32)
    out = out / jnp.moveaxis(denom, -1, 1)[..., None]
    lse = jnp.moveaxis(m + jnp.log(denom), -1, 1)  # [B, T, K, G]
    return out.reshape(B, T, H, D), lse.reshape(B, T, H)


def combine(out_a, lse_a, out_b, lse_b):
    """Merge two normalised partial attentions over disjoint key sets (log-sum-exp weights)."""
    m = jnp.maximum(lse_a, lse_b)
    wa, wb = jnp.exp(lse_a - m), jnp.exp(lse_b - m)
    total = wa + wb
    out = (out_a * wa[..., None] + out_b * wb[..., None]) / total[..., None]
    return out, m + jnp.log(total)


def _ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, axis: str, shards: int, scale: float):
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    has_seg = q_seg is not None
    out, lse = block_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, scale)

    def step(carry, _):
        out, lse, blk = carry
        blk = jax.tree.map(lambda x: lax.ppermute(x, axis, perm), blk)
        k_, v_, pos_, seg_ = blk if has_seg else (*blk, None)
        out_b, lse_b = block_attention(q, k_, v_, q_pos, pos_, q_seg, seg_, scale)
        out, lse = combine(out, lse, out_b, lse_b)
        return (out, lse, blk), None

    blk = (k, v, kv_pos, kv_seg) if has_seg else (k, v, kv_pos)
    (out, _, _), _ = lax.scan(step, (out, lse, blk), None, length=shards - 1)
    return out.astype(q.dtype)


def _all_gather(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, axis: str, local: LocalAttention):
    gather = lambda x: lax.all_gather(x, axis, axis=1, tiled=True)  # noqa: E731
    k, v, kv_pos = gather(k), gather(v), gather(kv_pos)
    kv_seg = None if kv_seg is None else gather(kv_seg)
    return local(q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def context_attention(
    q_BxTxHxD: jax.Array,
    k_BxTxKxD: jax.Array,
    v_BxTxKxD: jax.Array,
    *,
    positions_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None,
    local: LocalAttention,
    impl: str = "all_gather",
    sm_scale: float | None = None,
) -> jax.Array:
    """Self-attention of a sequence split over the ``sequence`` axis of the current mesh.

    Queries and keys are the same tokens (training / full forward). ``local`` is the per-shard
    attention used by ``all_gather``; ``ring`` uses :func:`block_attention`. Returns
    ``[batch, seq, heads, head_dim]`` in q's dtype, laid out like q.
    """
    if impl not in CONTEXT_IMPLS:
        raise ValueError(f"context_impl '{impl}' is not one of {', '.join(CONTEXT_IMPLS)}")
    mesh = jax.sharding.get_abstract_mesh()
    axis, shards = sequence_axis(), sequence_shards(mesh)
    scale = q_BxTxHxD.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    heads = logical_spec(("batch", "seq", "act_heads", "head_dim"))
    tokens = logical_spec(("batch", "seq"))
    has_seg = segment_ids_BxT is not None

    def body(q, k, v, pos, *seg):
        s = seg[0] if has_seg else None
        if impl == "ring":
            return _ring(q, k, v, pos, pos, s, s, axis=axis, shards=shards, scale=scale)
        return _all_gather(q, k, v, pos, pos, s, s, axis=axis, local=local)

    args = (q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, positions_BxT) + ((segment_ids_BxT,) if has_seg else ())
    specs = (heads, heads, heads, tokens) + ((tokens,) if has_seg else ())
    return per_shard(body, in_specs=specs, out_specs=heads)(*args)
