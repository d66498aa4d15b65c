"""The one model call: training forward, prefill and cached decode agree; layer stacking options agree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.build import build_model
from jaxlm.cache import init_cache
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config().model, seed=3)


def _rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@jax.jit
def _forward(model, tokens, positions):
    return model(tokens, positions)[0]


@jax.jit
def _step(model, tokens, positions, cache):
    return model(tokens, positions, cache)


def test_prefill_then_decode_equals_full_forward_ragged(model):
    cfg = model.cfg
    B, total, decode_steps = 3, 24, 6
    lengths = np.array([5, 11, 8])  # ragged prompts, right-padded to one prefill length
    tokens = jax.random.randint(jax.random.key(0), (B, total), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(total), (B, total))
    full = _forward(model, tokens, positions)  # [B, total, V]

    T = int(lengths.max())
    prompt = np.array(tokens[:, :T])
    for b, n in enumerate(lengths):
        prompt[b, n:] = 0  # padding must not matter
    cache = init_cache(cfg, B, 32)
    logits, cache = _step(model, jnp.asarray(prompt), positions[:, :T], cache)
    for b, n in enumerate(lengths):
        assert _rel_err(logits[b, :n], full[b, :n]) <= 1e-5
    for i in range(decode_steps):
        pos = jnp.asarray(lengths + i)[:, None]
        tok = jnp.take_along_axis(tokens, pos, axis=1)
        logits, cache = _step(model, tok, pos, cache)
        want = jnp.take_along_axis(full, pos[:, :, None], axis=1)
        assert _rel_err(logits, want) <= 1e-5, f"decode step {i}"


@pytest.mark.parametrize("variant", [{"scan_layers": False}, {"remat": "full"}, {"remat": "save_dots"}, {"remat": "offload"}])
def test_layer_loop_and_remat_match_scan(model, variant):
    cfg = dataclasses.replace(model.cfg, **variant)
    other = nnx.merge(nnx.graphdef(build_model(cfg, seed=3)), nnx.state(model))
    B, T = 2, 16
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(m):
        logits = m(tokens, positions)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0])

    l0, g0 = jax.jit(nnx.value_and_grad(loss))(model)
    l1, g1 = jax.jit(nnx.value_and_grad(loss))(other)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bf16_compute_stays_close_to_fp32(model):
    cfg = dataclasses.replace(model.cfg, compute_dtype="bfloat16")
    bf16 = nnx.merge(nnx.graphdef(build_model(cfg, seed=3)), nnx.state(model))
    B, T = 2, 32
    tokens = jax.random.randint(jax.random.key(2), (B, T), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    a, b = _forward(model, tokens, positions), _forward(bf16, tokens, positions)
    assert b.dtype == jnp.float32  # logits always float32
    assert jnp.all(jnp.isfinite(b))
    assert _rel_err(b, a) < 3e-2


def test_untied_head_and_parameter_names():
    cfg = dataclasses.replace(tiny_config().model, tie_embeddings=False)
    m = build_model(cfg, seed=0)
    state = nnx.state(m)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)}
    assert any("lm_head" in n for n in names)
    L, E = cfg.num_layers, cfg.embed_dim
    assert m.blocks.attn.wq.shape == (L, E, cfg.num_heads, cfg.head_dim)
    assert m.blocks.attn.wq.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
    tokens = jnp.zeros((1, 4), jnp.int32) + 7
    logits, cache = m(tokens, jnp.arange(4)[None])
    assert logits.shape == (1, 4, cfg.vocab_size) and cache is None
