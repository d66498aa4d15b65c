"""The Pallas decode-attention kernel (interpret mode on CPU) against the pure-JAX reference.

Every element is compared on random normal inputs: grouped-query ratios 1..8, one and several
query tokens, ragged lengths (shorter than a block, caches that are not a multiple of the
block, zero), several split counts, and the paged layout. Then the real Triton kernel is lowered
for CUDA on this CPU-only machine for every configuration the dispatcher can pick, the dispatcher
is checked against the XLA path (one device and a mesh), and greedy generation with
``attention_impl=pallas`` equals ``xla`` token for token.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.build import build_model
from jaxlm.config import DecodeConfig, MeshConfig
from jaxlm.generate import generate_tokens
from pallas_kernels.decode_attention import BLOCK_K, NUM_SPLITS, decode_attention
from pallas_kernels.dispatch import DECODE_MAX_QUERY_TOKENS, cached_attention
from pallas_kernels.reference import decode_attention_reference
from sharding.mesh import make_mesh
from tests.conftest import abstract_gpu, random_qkv, tiny_config

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _kernel(q, k, v, lengths, **kw):
    kw = {"block_k": 16, "num_splits": 2, **kw}
    return decode_attention(q, k, v, lengths, interpret=True, **kw)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got)), "NaN/inf in kernel result"
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_matches_reference_gqa_ragged(group, T):
    B, S, K, D = 3, 40, 2, 16  # S is not a multiple of the 16-key block
    q, k, v = random_qkv(group * 10 + T, B, T, S, K * group, K, D)
    lengths = jnp.array([S, 5, 19], jnp.int32)  # full, shorter than a block, mid-block
    _close(_kernel(q, k, v, lengths), decode_attention_reference(q, k, v, lengths), TOL[jnp.float32])


def test_bfloat16():
    q, k, v = random_qkv(1, 2, 3, 72, 8, 2, 32, jnp.bfloat16)
    lengths = jnp.array([70, 9], jnp.int32)
    got = _kernel(q, k, v, lengths, num_splits=3)
    assert got.dtype == jnp.bfloat16
    _close(got, decode_attention_reference(q, k, v, lengths), TOL[jnp.bfloat16])


def test_head_dim_padding_and_scale():
    q, k, v = random_qkv(2, 2, 2, 33, 4, 2, 24)  # head_dim 24 pads to 32
    lengths = jnp.array([33, 12], jnp.int32)
    _close(_kernel(q, k, v, lengths, sm_scale=0.3), decode_attention_reference(q, k, v, lengths, sm_scale=0.3),
           TOL[jnp.float32])


def test_rows_that_see_nothing_are_zero_not_nan():
    T = 3
    q, k, v = random_qkv(3, 3, T, 40, 4, 2, 16)  # the shapes of test_matches_reference_gqa_ragged[2-3]
    lengths = jnp.array([0, 2, 40], jnp.int32)  # row 0 sees nothing, row 1's first query neither
    got = np.asarray(_kernel(q, k, v, lengths))
    assert np.all(np.isfinite(got))
    assert np.all(got[0] == 0) and np.all(got[1, 0] == 0) and np.any(got[1, 1:] != 0)
    _close(got, decode_attention_reference(q, k, v, lengths), TOL[jnp.float32])


def test_split_count_does_not_change_the_result():
    q, k, v = random_qkv(4, 2, 3, 80, 8, 2, 16)
    lengths = jnp.array([80, 37], jnp.int32)
    want = decode_attention_reference(q, k, v, lengths)
    outs = [np.asarray(_kernel(q, k, v, lengths, num_splits=n)) for n in (1, 2, 5)]
    for got in outs:
        _close(got, want, TOL[jnp.float32])
        np.testing.assert_allclose(got, outs[0], atol=1e-5, rtol=1e-5)


def test_reads_no_block_past_the_length():
    """Cache blocks wholly past a sequence's length are never loaded: NaN there changes nothing."""
    B, T, S, H, K, D = 2, 3, 80, 8, 2, 16  # the shapes of test_split_count_does_not_change_the_result
    q, k, v = random_qkv(5, B, T, S, H, K, D)
    lengths = jnp.array([21, 40], jnp.int32)  # the 16-blocks from index 48 on are past both
    idx = jnp.arange(S)[None, :, None, None]
    block_end = ((lengths + 15) // 16 * 16)[:, None, None, None]
    poison = lambda x: jnp.where(idx >= block_end, jnp.nan, jnp.where(idx >= lengths[:, None, None, None], 1e3, x))
    got = _kernel(q, poison(k), poison(v), lengths, num_splits=1)
    _close(got, decode_attention_reference(q, k, v, lengths), TOL[jnp.float32])


@pytest.mark.parametrize("T, group, num_splits", [(1, 2, 1), (3, 4, 3)])
def test_paged_matches_reference(T, group, num_splits):
    B, K, D, page_size, pages_per_seq, num_pages = 3, 2, 16, 16, 4, 14
    q, _, _ = random_qkv(6 + T, B, T, 1, K * group, K, D)
    kk, kv, kp = jax.random.split(jax.random.key(7), 3)
    k_pool = jax.random.normal(kk, (num_pages, page_size, K, D), jnp.float32)
    v_pool = jax.random.normal(kv, (num_pages, page_size, K, D), jnp.float32)
    lengths = jnp.array([64, 17, 3], jnp.int32)
    table = np.asarray(jax.random.permutation(kp, num_pages)[: B * pages_per_seq]).reshape(B, pages_per_seq)
    used = np.arange(pages_per_seq)[None, :] * page_size < np.asarray(lengths)[:, None]
    table = jnp.asarray(np.where(used, table, 10**6), jnp.int32)  # unused entries: out of range, never read
    want = decode_attention_reference(q, k_pool, v_pool, lengths, page_table_BxP=table)
    got = decode_attention(q, k_pool, v_pool, lengths, page_table_BxP=table, num_splits=num_splits, interpret=True)
    _close(got, want, TOL[jnp.float32])


def test_bad_arguments_raise_one_line():
    q, k, v = random_qkv(8, 1, 1, 16, 2, 1, 16)
    lengths = jnp.array([4], jnp.int32)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        decode_attention(q, k, v, lengths, block_k=24, interpret=True)
    with pytest.raises(ValueError, match="share one dtype"):
        decode_attention(q.astype(jnp.bfloat16), k, v, lengths, interpret=True)
    with pytest.raises(ValueError, match="lengths must have shape"):
        decode_attention(q, k, v, jnp.array([4, 4]), interpret=True)


# --------------------------------------------------------------------------------------------
# the real kernel, lowered for CUDA


def _consumers(jaxpr, var):
    return [e.primitive.name for e in jaxpr.eqns if any(v is var for v in e.invars)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_lowers_to_triton_for_cuda(dtype):
    """Every (block_k, num_splits, tail mask) the dispatcher's defaults can pick, T = 1 and the
    largest T it sends here, lowers through Pallas-Triton for CUDA as one kernel; the caches
    feed that kernel directly (no transpose, repeat or pad of the cache).

    Lowering runs the Pallas-to-Triton-IR conversion, so a primitive Triton cannot express fails
    here even without a GPU; only the Triton compiler's own passes (PTX) are left untested.
    """
    B, H, K, D = 2, 8, 2, 64
    L = jax.ShapeDtypeStruct((B,), jnp.int32)
    # S -> block_k: 16 -> 16, 32 -> 32, 40 -> 64 (tail masked), 520 -> 64 (9 splits' worth, tail)
    for S in (16, 32, 40, 520):
        for T in (1, DECODE_MAX_QUERY_TOKENS):
            q = jax.ShapeDtypeStruct((B, T, H, D), dtype)
            kv = jax.ShapeDtypeStruct((B, S, K, D), dtype)
            fn = lambda q, k, v, L: decode_attention(q, k, v, L, block_k=BLOCK_K, num_splits=NUM_SPLITS)
            with abstract_gpu():
                text = jax.jit(fn).trace(q, kv, kv, L).lower(lowering_platforms=("cuda",)).as_text()
            assert text.count("custom_call @__gpu$xla.gpu.triton(") == 1, (S, T)
            inner = jax.make_jaxpr(fn)(q, kv, kv, L).jaxpr.eqns[0].params["jaxpr"].jaxpr
            assert _consumers(inner, inner.invars[1]) == ["pallas_call"], (S, T)
            assert _consumers(inner, inner.invars[2]) == ["pallas_call"], (S, T)
    pool = jax.ShapeDtypeStruct((12, 16, K, D), dtype)
    table = jax.ShapeDtypeStruct((B, 4), jnp.int32)
    q = jax.ShapeDtypeStruct((B, 1, H, D), dtype)
    fn = lambda q, k, v, L, t: decode_attention(q, k, v, L, page_table_BxP=t)
    with abstract_gpu():
        text = jax.jit(fn).trace(q, pool, pool, L, table).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @__gpu$xla.gpu.triton(") == 1


# --------------------------------------------------------------------------------------------
# the dispatcher and the model


def _cached_inputs(seed, B, T, S, H, K, D, lengths):
    q, k, v = random_qkv(seed, B, T, S, H, K, D)
    positions = jnp.asarray(lengths, jnp.int32)[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]
    return q, k, v, positions


@pytest.mark.parametrize("T", [1, DECODE_MAX_QUERY_TOKENS, DECODE_MAX_QUERY_TOKENS + 4])
def test_cached_attention_pallas_equals_xla_on_a_mesh(T, devices):
    B, S, H, K, D = 4, 48, 4, 2, 16
    q, k, v, pos = _cached_inputs(9 + T, B, T, S, H, K, D, [48, 20, 31, T])

    def run(impl):
        return jax.jit(lambda q, k, v, pos: cached_attention(q, k, v, q_positions=pos, impl=impl))(q, k, v, pos)

    want = run("xla")
    jaxpr = str(jax.make_jaxpr(lambda *a: cached_attention(*a[:3], q_positions=a[3], impl="pallas"))(q, k, v, pos))
    assert ("decode_attention" in jaxpr) == (T <= DECODE_MAX_QUERY_TOKENS)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)):
        _close(run("pallas"), want, TOL[jnp.float32])


GREEDY = DecodeConfig(max_new_tokens=6, temperature=0.0)
# ragged prompts; the prefill (32 tokens) runs the flash kernel, every later step the decode kernel
PROMPTS = [[11, 250, 7], list(range(100, 120)), [512]]


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config("model.init_std=0.2").model
    return {impl: build_model(dataclasses.replace(cfg, attention_impl=impl), seed=5) for impl in ("xla", "pallas")}


def test_greedy_generation_pallas_equals_xla(models, devices):
    want = generate_tokens(models["xla"], PROMPTS, GREEDY)
    assert generate_tokens(models["pallas"], PROMPTS, GREEDY) == want
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    assert generate_tokens(models["pallas"], PROMPTS, GREEDY, mesh=mesh) == want
