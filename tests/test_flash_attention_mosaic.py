"""The Hopper Mosaic GPU flash-attention forward: interpreter numerics, cross-lowering, fallback.

No GPU needed: numerics run in the Pallas Mosaic GPU interpreter (it simulates the warpgroups,
shared memory, TMA, barriers and wgmma on CPU, slowly, hence tiny shapes), and lowering targets
an abstract H100 so the Mosaic compiler sees every configuration the dispatcher can pick.
"""

import faulthandler
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh

from pallas_kernels import flash_attention, attention_reference
from pallas_kernels.flash_attention_mosaic import flash_attention_mosaic, unsupported_reason
from tests.conftest import random_qkv

_H100 = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"))


@pytest.fixture
def watchdog():
    """The interpreter runs warpgroups as threads; a kernel error can leave the others waiting on a
    barrier forever. Fail loudly (tracebacks, exit) instead of hanging the suite."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _loss(attn, D):
    w = jnp.cos(jnp.arange(D, dtype=jnp.float32))[None, None, None, :]  # a non-uniform cotangent
    return lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * w)


def _close(got, want, tol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_interpreter_forward_and_gradient_bf16_gqa_prefill(watchdog):
    # GQA (2 q heads per kv head), T=100 padded to 128, S=192 in 3 kv tiles of 64 through a
    # 2-slot ring (refill and drain), queries offset into the keys (prefill-like positions 12..111):
    # the first kv tile partly masked, the second partly, the third skipped by both warpgroups.
    B, T, S, H, K, D = 1, 100, 192, 2, 1, 64
    q, k, v = random_qkv(0, B, T, S, H, K, D, jnp.bfloat16)
    q_pos = jnp.broadcast_to(jnp.arange(T) + 12, (B, T))
    kv_pos = jnp.broadcast_to(jnp.arange(S), (B, S))

    def mosaic(q, k, v):
        return flash_attention_mosaic(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos,
                                      block_kv=64, interpret=True)

    def ref(q, k, v):
        return attention_reference(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos)

    out = mosaic(q, k, v)
    assert out.dtype == jnp.bfloat16 and out.shape == q.shape
    _close(out, ref(q, k, v), 2e-2)
    got = jax.grad(_loss(mosaic, D), (0, 1, 2))(q, k, v)
    want = jax.grad(_loss(ref, D), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        _close(g, w, 3e-2)


def test_interpreter_forward_fp16_head_dim_128_causal(watchdog):
    B, T, H, K, D = 1, 128, 1, 1, 128
    q, k, v = random_qkv(3, B, T, T, H, K, D, jnp.float16)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    out = flash_attention_mosaic(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, block_kv=64,
                                 interpret=True)
    assert out.dtype == jnp.float16
    _close(out, attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos), 5e-3)


def _custom_calls(fn, *args) -> list[str]:
    with jax.sharding.use_abstract_mesh(_H100):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return re.findall(r"custom_call @([\w$.]+)", text)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cross_lowers_for_h100_forward_and_gradient(dtype, head_dim):
    """Every config the dispatcher sends to the Mosaic kernel lowers (Mosaic compiler included)."""
    B, T, H, K = 2, 384, 4, 2
    q = jax.ShapeDtypeStruct((B, T, H, head_dim), dtype)
    k = jax.ShapeDtypeStruct((B, T, K, head_dim), dtype)
    pos = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def attn(q, k, v, pos):
        return flash_attention(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, backend="mosaic")

    assert _custom_calls(attn, q, k, k, pos) == ["mosaic_gpu_v2"]
    grad = jax.grad(lambda q, k, v, pos: _loss(lambda *a: attn(*a, pos), head_dim)(q, k, v), (0, 1, 2))
    calls = _custom_calls(grad, q, k, k, pos)
    assert calls.count("mosaic_gpu_v2") == 1 and len(calls) == 3  # + Triton dq and dk/dv


def test_cross_lowers_for_h100_decode_shape():
    """One query against a cache of odd length (padded to the tiles), GQA 4:1."""
    q = jax.ShapeDtypeStruct((2, 1, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 1000, 2, 128), jnp.bfloat16)

    def attn(q, k, v, q_pos, kv_pos):
        return flash_attention(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos, backend="mosaic")

    args = (q, k, k, jax.ShapeDtypeStruct((2, 1), jnp.int32), jax.ShapeDtypeStruct((2, 1000), jnp.int32))
    assert _custom_calls(attn, *args) == ["mosaic_gpu_v2"]


@pytest.mark.parametrize(
    "dtype, head_dim, segments, fragment",
    [
        (jnp.float32, 64, False, "dtype float32"),
        (jnp.bfloat16, 32, False, "head_dim 32"),
        (jnp.bfloat16, 64, True, "segment ids"),
    ],
)
def test_unsupported_inputs_fall_back_to_triton_loudly(dtype, head_dim, segments, fragment):
    assert fragment in unsupported_reason(dtype, head_dim, segments)
    B, T, H = 1, 32, 2
    q, k, v = random_qkv(1, B, T, T, H, H, head_dim, dtype)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.broadcast_to((jnp.arange(T) >= 12).astype(jnp.int32), (B, T)) if segments else None
    kwargs = dict(q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = flash_attention(q, k, v, **kwargs, interpret=True, backend="mosaic")
    assert any(fragment in str(w.message) and "Triton" in str(w.message) for w in caught)
    _close(got, flash_attention(q, k, v, **kwargs, interpret=True), 0)  # the Triton result exactly
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    _close(got, attention_reference(q, k, v, **kwargs), tol)


def test_rejects_unsupported_inputs_directly():
    q, k, v = random_qkv(0, 1, 16, 16, 2, 2, 64, jnp.float32)
    pos = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="dtype float32 is not bfloat16/float16"):
        flash_attention_mosaic(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)
    with pytest.raises(ValueError, match="backend 'cuda' is not one of triton, mosaic"):
        flash_attention(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, backend="cuda")
