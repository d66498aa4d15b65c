"""The reference attention against an independent formulation (repeat K/V, jax.nn.dot_product_attention)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import Call, attention, attention_reference, select
from jaxlm.config import ConfigError


def _independent(q, k, v, mask_BxTxS):
    G = q.shape[2] // k.shape[2]
    k_rep, v_rep = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    return jax.nn.dot_product_attention(q, k_rep, v_rep, mask=mask_BxTxS[:, None], implementation="xla")


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)])
def test_causal_gqa_matches_repeated_kv(heads, kv_heads):
    B, T, D = 2, 24, 16
    kq, kk, kv = jax.random.split(jax.random.key(heads * 10 + kv_heads), 3)
    q = jax.random.normal(kq, (B, T, heads, D), jnp.float32)
    k = jax.random.normal(kk, (B, T, kv_heads, D), jnp.float32)
    v = jax.random.normal(kv, (B, T, kv_heads, D), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    got = attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)
    want = _independent(q, k, v, jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_segments_block_cross_document_attention():
    B, T, H, D = 2, 16, 4, 8
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (B, T, H, D))
    k = jax.random.normal(kk, (B, T, 2, D))
    v = jax.random.normal(kv, (B, T, 2, D))
    seg = jnp.array([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    # positions restart in each document, as packing produces them
    pos = jnp.array([list(range(5)) + list(range(7)) + list(range(4)), list(range(16))])
    got = attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg)
    idx = jnp.arange(T)
    mask = (idx[None, :, None] >= idx[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
    np.testing.assert_allclose(got, _independent(q, k, v, mask), rtol=1e-5, atol=1e-5)
    # and the first document's outputs do not change when later documents do
    v2 = v.at[0, 5:].set(jax.random.normal(jax.random.key(9), (11, 2, D)))
    got2 = attention_reference(q, k, v2, q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg)
    np.testing.assert_array_equal(got[0, :5], got2[0, :5])


def test_bf16_inputs_keep_float32_softmax():
    B, T, H, D = 1, 64, 2, 32
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(x, (B, T, H, D)).astype(jnp.bfloat16) for x in (kq, kk, kv))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    # the same (bf16-representable) inputs in float32: only the arithmetic differs
    want = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), q_positions_BxT=pos, kv_positions_BxS=pos)
    got = attention_reference(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos)
    assert got.dtype == jnp.bfloat16
    assert jnp.all(jnp.isfinite(got))
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "impl, platform, cc, want",
    [
        ("auto", "cpu", None, "xla"),
        ("auto", "gpu", "9.0", "cudnn"),  # measured fastest on an H200 (kernel table's docstring)
        ("auto", "cuda", "9.0", "cudnn"),
        ("auto", "gpu", "8.0", "cudnn"),
        ("auto", "gpu", "10.0", "cudnn"),
        ("auto", "gpu", "7.5", "xla"),  # before Ampere: neither cuDNN's flash attention nor the Triton kernels
        ("pallas", "cpu", None, "flash_triton"),  # the interpreter
        ("pallas", "gpu", "9.0", "flash_mosaic"),
        ("pallas", "gpu", "8.9", "flash_triton"),
        ("cudnn", "gpu", "9.0", "cudnn"),
        ("cudnn", "gpu", "8.0", "cudnn"),
        ("xla", "gpu", "9.0", "xla"),
        ("xla", "cpu", None, "xla"),
    ],
)
def test_dispatch_table(impl, platform, cc, want):
    call = Call(jnp.bfloat16, head_dim=64)
    assert select("attention", call, impl=impl, platform=platform, capability=cc).kernel == want


def test_dispatch_cudnn_on_cpu_is_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^attention_impl 'cudnn' has no kernel for cpu \(cudnn: not on cpu\)[^\n]*$"):
        select("attention", Call(jnp.bfloat16, head_dim=4), impl="cudnn", platform="cpu", capability=None)
    q = jnp.ones((1, 2, 2, 4))
    pos = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ConfigError, match="'cudnn' has no kernel for cpu"):
        attention(q, q, q, q_positions=pos, kv_positions=pos, impl="cudnn")  # this machine is a CPU


def test_dispatch_rejects_unknown_impl():
    call = Call(jnp.float32, head_dim=64)
    with pytest.raises(ConfigError, match="attention_impl 'pallas' has no kernel for tpu"):
        select("attention", call, impl="pallas", platform="tpu", capability=None)
    with pytest.raises(ConfigError, match="attention_impl 'flash' is not available"):
        select("attention", call, impl="flash", platform="cpu", capability=None)
    with pytest.raises(ConfigError, match="attention_impl 'cudnn' has no kernel for tpu"):
        select("attention", call, impl="cudnn", platform="tpu", capability=None)
