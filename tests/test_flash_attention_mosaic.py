"""The Hopper Mosaic GPU flash-attention forward: interpreter numerics and what it is selected for.

No GPU needed: numerics run in the Pallas Mosaic GPU interpreter (it simulates the warpgroups,
shared memory, TMA, barriers and wgmma on CPU, slowly, hence tiny shapes). The real sm_90a
compile of every configuration the kernel table can pick is tests/test_kernel_resources.py.
"""

import faulthandler

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Call, attention_reference, select
from pallas_kernels.flash_attention_mosaic import flash_attention_mosaic
from tests.conftest import random_qkv

# jax exports no public name for the Mosaic GPU interpreter's parameters; the package takes them
# from its caller, so the private import stays here in the tests.
_params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
INTERPRET = _params.InterpretGPUParams()


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
                                      block_kv=64, interpret=INTERPRET)

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
                                 interpret=INTERPRET)
    assert out.dtype == jnp.float16
    _close(out, attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos), 5e-3)


@pytest.mark.parametrize(
    "dtype, head_dim, segments, fragment",
    [
        (jnp.float32, 64, False, "dtype float32"),
        (jnp.bfloat16, 32, False, "head_dim 32"),
        (jnp.bfloat16, 128, False, "head_dim 128"),  # spills on sm_90a (tests/test_kernel_resources.py)
        (jnp.bfloat16, 64, True, "segment ids"),
    ],
)
def test_inputs_the_kernel_cannot_serve_select_triton_with_the_reason(dtype, head_dim, segments, fragment):
    call = Call(dtype, head_dim=head_dim, segment_ids=segments)
    chosen = select("attention", call, impl="pallas", platform="gpu", capability="9.0")
    assert chosen.kernel == "flash_triton" and chosen.substituted
    assert f"instead of flash_mosaic: {fragment}" in chosen.reason
    served = select("attention", Call(jnp.bfloat16, head_dim=64), impl="pallas", platform="gpu", capability="9.0")
    assert served.kernel == "flash_mosaic" and not served.substituted


def test_rejects_unsupported_inputs_directly():
    q, k, v = random_qkv(0, 1, 16, 16, 2, 2, 64, jnp.float32)
    pos = jnp.zeros((1, 16), jnp.int32)
    with pytest.raises(ValueError, match="dtype float32 is not bfloat16/float16"):
        flash_attention_mosaic(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(ValueError, match="head_dim 32 is not 64 or 128"):
        flash_attention_mosaic(q16[..., :32], k16[..., :32], v16[..., :32], q_positions_BxT=pos, kv_positions_BxS=pos)
