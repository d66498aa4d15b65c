"""The Pallas flash-attention kernel (interpret mode on CPU) against the pure-JAX reference.

Every element is compared, on random normal inputs, for the forward pass and for dq/dk/dv; a
last test lowers the real (non-interpreted) Triton kernels for CUDA on this CPU-only machine.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference
from tests.conftest import abstract_gpu, random_qkv

BLOCK = 16
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _kernel(q, k, v, **kw):
    return flash_attention(q, k, v, block_q=BLOCK, block_k=BLOCK, interpret=True, **kw)


@functools.partial(jax.jit, static_argnums=0)
def _run(fn, q, k, v, kw):
    return fn(q, k, v, **kw)


@functools.partial(jax.jit, static_argnums=0)
def _vjp(fn, q, k, v, ct, kw):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return out, pullback(ct)


def _causal(B, T):
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return {"q_positions_BxT": pos, "kv_positions_BxS": pos}


def _packed(doc_lens_per_row):
    """Segment ids and positions (restarting per document) for packed rows."""
    seg = [np.repeat(np.arange(len(lens)), lens) for lens in doc_lens_per_row]
    pos = [np.concatenate([np.arange(n) for n in lens]) for lens in doc_lens_per_row]
    seg, pos = jnp.asarray(np.stack(seg), jnp.int32), jnp.asarray(np.stack(pos), jnp.int32)
    return {"q_positions_BxT": pos, "kv_positions_BxS": pos, "q_segment_ids_BxT": seg, "kv_segment_ids_BxS": seg}


def _close(got, want, tol, scale_by_max=False):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got)), "NaN/inf in kernel result"
    atol = tol * max(1.0, float(np.abs(want).max())) if scale_by_max else tol
    np.testing.assert_allclose(got, want, rtol=tol, atol=atol)


def _check_forward(q, k, v, kw):
    got = _run(_kernel, q, k, v, kw)
    want = _run(attention_reference, q, k, v, kw)
    assert got.dtype == q.dtype and got.shape == q.shape
    _close(got, want, TOL[q.dtype.type])


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_forward_gqa_ragged_length(group):
    B, T, H, D = 2, 37, 8, 16  # 37 is not a multiple of the block: padded and masked
    q, k, v = random_qkv(group, B, T, T, H, H // group, D)
    _check_forward(q, k, v, _causal(B, T))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_dtypes_and_head_dim(dtype):
    B, T, H, K, D = 1, 40, 4, 2, 32
    q, k, v = random_qkv(5, B, T, T, H, K, D, dtype)
    _check_forward(q, k, v, _causal(B, T))


def test_forward_pads_head_dim():
    B, T, H, K, D = 2, 24, 4, 1, 20  # head_dim 20 runs padded to 32
    q, k, v = random_qkv(6, B, T, T, H, K, D)
    _check_forward(q, k, v, _causal(B, T))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_packed_documents(dtype):
    kw = _packed([[10, 20, 7], [37]])
    q, k, v = random_qkv(7, 2, 37, 37, 4, 2, 16, dtype)
    _check_forward(q, k, v, kw)
    # kv segment ids default to the query's, as in the reference
    _check_forward(q, k, v, {**kw, "kv_segment_ids_BxS": None})


def test_forward_documents_do_not_leak():
    kw = _packed([[10, 20, 7], [37]])
    q, k, v = random_qkv(8, 2, 37, 37, 4, 2, 16)
    v2 = v.at[0, 10:].set(jax.random.normal(jax.random.key(80), (27, 2, 16)))
    np.testing.assert_array_equal(_run(_kernel, q, k, v, kw)[0, :10], _run(_kernel, q, k, v2, kw)[0, :10])


def test_forward_cached_decode():
    B, T, S, H, K, D = 2, 3, 40, 8, 2, 16
    q, k, v = random_qkv(9, B, T, S, H, K, D)
    start = jnp.array([[20], [37]], jnp.int32)  # keys past the newest query are unwritten cache
    kw = {
        "q_positions_BxT": start + jnp.arange(T, dtype=jnp.int32)[None, :],
        "kv_positions_BxS": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
    }
    _check_forward(q, k, v, kw)
    got = flash_attention(q, k, v, **kw, block_q=16, block_k=32, interpret=True)  # unequal blocks
    _close(got, _run(attention_reference, q, k, v, kw), TOL[jnp.float32])


@pytest.mark.parametrize(
    "group, T, packed",
    [(1, 37, False), (4, 37, False), (4, 37, True)],
    ids=["gqa1-ragged", "gqa4-ragged", "gqa4-packed"],
)
def test_gradients_match_reference(group, T, packed):
    B, H, D = 2, 8, 16
    q, k, v = random_qkv(10 + group, B, T, T, H, H // group, D)
    ct = jax.random.normal(jax.random.key(99), q.shape, q.dtype)  # a random cotangent
    kw = _packed([[10, 20, 7], [37]]) if packed else _causal(B, T)
    out, grads = _vjp(_kernel, q, k, v, ct, kw)
    want_out, want_grads = _vjp(attention_reference, q, k, v, ct, kw)
    _close(out, want_out, TOL[jnp.float32])
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        _close(got, want, TOL[jnp.float32], scale_by_max=True)


def test_fully_masked_row_is_zero_not_nan():
    B, T, H, K, D = 1, 20, 4, 2, 16
    q, k, v = random_qkv(12, B, T, T, H, K, D)
    kw = _causal(B, T)
    kw["q_positions_BxT"] = kw["q_positions_BxT"].at[0, 0].set(-1)  # precedes every key
    ct = jax.random.normal(jax.random.key(98), q.shape, q.dtype)
    out, (dq, dk, dv) = _vjp(_kernel, q, k, v, ct, kw)
    for x in (out, dq, dk, dv):
        assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_array_equal(out[0, 0], 0.0)
    np.testing.assert_array_equal(dq[0, 0], 0.0)
    # rows that see keys are unaffected by the empty one
    _close(out[:, 1:], _run(attention_reference, q, k, v, kw)[:, 1:], TOL[jnp.float32])


def test_block_sizes_must_be_powers_of_two():
    q, k, v = random_qkv(13, 1, 16, 16, 2, 1, 16)
    with pytest.raises(AssertionError, match="powers of two"):
        flash_attention(q, k, v, **_causal(1, 16), block_q=24, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, segments", [(8, 2, False), (12, 4, True)])
def test_lowers_to_triton_for_cuda(dtype, heads, kv_heads, segments):
    """The real kernels (interpret=False) lower through Pallas-Triton for CUDA, forward and VJP.

    Lowering runs the Pallas-to-Triton-IR conversion, so a primitive Triton cannot express fails
    here even without a GPU; only the Triton compiler's own passes (PTX) are left untested.
    """
    B, T, D = 2, 100, 40  # ragged T and a head_dim that needs padding
    q = jax.ShapeDtypeStruct((B, T, heads, D), dtype)
    kv = jax.ShapeDtypeStruct((B, T, kv_heads, D), dtype)
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    seg = ids if segments else None

    def fwd(q, k, v, pos, seg):
        return flash_attention(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos,
                               q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg,
                               block_q=64, block_k=64, interpret=False)

    def loss(q, k, v, pos, seg):
        return jnp.sum(fwd(q, k, v, pos, seg).astype(jnp.float32))

    for fn, kernels in ((fwd, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
        with abstract_gpu():
            lowered = jax.jit(fn).trace(q, kv, kv, ids, seg).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton(") == kernels


def test_padded_keys_invisible_even_to_the_largest_position():
    B, T, S, H, K, D = 1, 4, 21, 2, 1, 16  # S padded to 32
    q, k, v = random_qkv(14, B, T, S, H, K, D)
    kw = {
        "q_positions_BxT": jnp.full((B, T), jnp.iinfo(jnp.int32).max, jnp.int32),
        "kv_positions_BxS": jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)),
    }
    _check_forward(q, k, v, kw)


def test_wholly_masked_tiles_are_skipped():
    # Causal, two 16-blocks: the first query block never touches the second key block, so even
    # NaN values there (garbage in an unwritten cache, say) cannot reach its rows.
    B, T, H, K, D = 1, 32, 2, 1, 16
    q, k, v = random_qkv(15, B, T, T, H, K, D)
    kw = _causal(B, T)
    poisoned = v.at[:, 16:].set(jnp.nan)
    got = _run(_kernel, q, k, poisoned, kw)[:, :16]
    _close(got, _run(attention_reference, q, k, v, kw)[:, :16], TOL[jnp.float32])
