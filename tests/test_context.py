"""Context-parallel attention (sequence split over the mesh) against the single-device reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.config import MeshConfig
from pallas_kernels.dispatch import attention
from pallas_kernels.reference import attention_reference
from sharding.context import block_attention, combine, load_balance_order
from sharding.mesh import make_mesh
from sharding.rules import logical_sharding

B, T, H, K, D = 2, 32, 4, 2, 8


def test_load_balance_order_is_a_balanced_permutation():
    for shards in (2, 4, 8):
        order = load_balance_order(64, shards)
        assert sorted(order.tolist()) == list(range(64))
        # visible causal pairs (query p sees keys <= p) per shard: p + 1 summed over its tokens
        work = [(order[i * 64 // shards : (i + 1) * 64 // shards] + 1).sum() for i in range(shards)]
        assert len(set(work)) == 1, work
    with pytest.raises(ValueError, match="multiple of 2 \\* 4"):
        load_balance_order(20, 4)


def test_block_combine_equals_attention_over_the_union():
    """Splitting the keys in two and merging by log-sum-exp gives attention over all keys."""
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, K, D))
    v = jax.random.normal(ks[2], (B, T, K, D))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    a = block_attention(q, k[:, :12], v[:, :12], pos, pos[:, :12], None, None, D**-0.5)
    b = block_attention(q, k[:, 12:], v[:, 12:], pos, pos[:, 12:], None, None, D**-0.5)
    out, _ = combine(*a, *b)
    want = attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def _inputs(seed, packed):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, T, K, D))
    v = jax.random.normal(ks[2], (B, T, K, D))
    ct = jax.random.normal(ks[3], (B, T, H, D))
    if packed:  # two documents per row, positions restarting at each
        lens = [(11, 21), (25, 7)]
        seg = np.stack([np.repeat(np.arange(2), l) for l in lens]).astype(np.int32)
        pos = np.stack([np.concatenate([np.arange(n) for n in l]) for l in lens]).astype(np.int32)
    else:
        seg, pos = None, np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return q, k, v, ct, pos, seg


def _value_and_grads(fn, q, k, v, ct):
    out, pullback = jax.vjp(fn, q, k, v)
    return (out, *pullback(ct))


@pytest.mark.parametrize(
    "mesh_cfg,n_devices,context_impl,impl,packed",
    [
        (MeshConfig(fsdp=1, sequence=4), 4, "ring", "xla", True),
        (MeshConfig(fsdp=1, sequence=4), 4, "all_gather", "xla", False),
        (MeshConfig(fsdp=1, sequence=8), 8, "ring", "xla", False),
        (MeshConfig(data=2, fsdp=1, sequence=2, tensor=2), 8, "all_gather", "pallas", True),
        (MeshConfig(data=2, fsdp=1, sequence=2, tensor=2), 8, "ring", "xla", True),
    ],
    ids=["seq4_ring_packed", "seq4_all_gather", "seq8_ring", "data2_seq2_tensor2_all_gather_pallas", "data2_seq2_tensor2_ring_packed"],
)
def test_context_attention_matches_reference(devices, mesh_cfg, n_devices, context_impl, impl, packed):
    q, k, v, ct, pos, seg = _inputs(n_devices, packed)
    want = _value_and_grads(
        lambda q, k, v: attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos,
                                            q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg),
        q, k, v, ct,
    )
    mesh = make_mesh(mesh_cfg, devices[:n_devices])
    order = load_balance_order(T, mesh.shape["sequence"])  # tokens reordered, as the data pipeline does
    perm = lambda x: None if x is None else x[:, order]  # noqa: E731
    heads, tokens = logical_sharding(mesh, ("batch", "seq", "act_heads", "head_dim")), logical_sharding(mesh, ("batch", "seq"))
    args = [jax.device_put(perm(x), heads) for x in (q, k, v, ct)]
    pos_p = jax.device_put(perm(pos), tokens)
    seg_p = None if seg is None else jax.device_put(perm(seg), tokens)

    @jax.jit
    def run(q, k, v, ct, pos, seg):
        fn = functools.partial(attention, q_positions=pos, kv_positions=pos, segment_ids=seg,
                               impl=impl, context_impl=context_impl)
        return _value_and_grads(fn, q, k, v, ct)

    with jax.set_mesh(mesh):
        got = run(*args, pos_p, seg_p)
    inverse = np.argsort(order)
    for g, w, name in zip(got, want, ("out", "dq", "dk", "dv")):
        g = np.asarray(g)[:, inverse]
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, np.asarray(w), rtol=2e-5, atol=2e-5, err_msg=name)
