"""Precision policies: float32 accumulation where it matters, float16 dynamic loss scaling, and the
optimizer's numerics (gradient accumulation equals the full batch, the weight-decay mask)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.build import abstract_model
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.data import PackedLoader, load_splits, load_tokenizer, to_global_batch
from jaxlm.model import RMSNorm
from jaxlm.optim import accumulate_gradients, decay_mask
from jaxlm.precision import LossScale, init_loss_scale, policy_for, update_loss_scale
from jaxlm.train import Trainer, cross_entropy, make_loss_fn
from sharding.mesh import make_mesh
from tests.conftest import batches_and_params, tiny_config

STEPS = 16
BASE = (f"train.steps={STEPS}", "train.warmup_steps=3")


def _bf16_sequential_sum(x: jax.Array) -> jax.Array:
    """The naive reduction: add one term at a time into a bfloat16 accumulator."""
    total, _ = jax.lax.scan(lambda acc, v: (acc + v, None), jnp.bfloat16(0), x.astype(jnp.bfloat16))
    return total


# ---------------------------------------------------------------- float32 accumulation


def test_rmsnorm_of_long_large_bf16_rows_accumulates_in_fp32():
    n = 8192
    x = (jax.random.normal(jax.random.key(0), (2, 3, n)) * 60 + 300).astype(jnp.bfloat16)
    with nnx.use_eager_sharding(False):
        norm = RMSNorm(n, 1e-5, "float32")
    y = norm(x)
    assert y.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    ms = np.mean(x64 * x64, axis=-1, keepdims=True)
    want = x64 / np.sqrt(ms + 1e-5)
    # within one bfloat16 ulp of the float64 result, every element
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2.0**-7, atol=0)
    # summing the squares in bfloat16 stalls once the total dwarfs each term: the mean square is far off
    naive_ms = np.array([float(_bf16_sequential_sum(r * r)) / n for r in x.reshape(-1, n)])
    rel = np.abs(naive_ms - ms.reshape(-1)) / ms.reshape(-1)
    assert np.all(rel > 0.5), rel


def test_loss_over_a_long_sequence_accumulates_in_fp32():
    T, V = 32768, 16
    logits = (jax.random.normal(jax.random.key(1), (1, T, V)) * 30).astype(jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(2), (1, T), 0, V)
    l64 = np.asarray(logits, np.float64)[0]
    m = l64.max(-1, keepdims=True)
    per_token = (np.log(np.exp(l64 - m).sum(-1)) + m[:, 0]) - l64[np.arange(T), np.asarray(targets)[0]]
    want = per_token.mean()
    got = float(cross_entropy(logits, targets))
    assert abs(got - want) <= 1e-5 * want, (got, want)
    naive = float(_bf16_sequential_sum(jnp.asarray(per_token))) / T
    assert abs(naive - want) > 0.2 * want, (naive, want)


# ---------------------------------------------------------------- dynamic loss scaling


def _reference_scale(scale: float, good: int, finite: bool, period: int) -> tuple[float, int]:
    if not finite:
        return max(scale / 2, 1.0), 0
    good += 1
    return (scale * 2, 0) if good >= period else (scale, good)


def test_loss_scale_update_rule():
    policy = policy_for(tiny_config("model.compute_dtype=float16", "train.loss_scale_init=8", "train.loss_scale_period=3"))
    flags = [True, True, True, False, True, False, False, False, False, True, True, True, True]
    ls, want = init_loss_scale(policy), (8.0, 0)
    for f in flags:
        ls = update_loss_scale(ls, jnp.bool_(f), policy)
        want = _reference_scale(*want, f, 3)
        assert (float(ls.scale), int(ls.good_steps)) == want
    assert float(ls.scale) == 2.0  # halved to the floor of 1, then grew once
    fp32 = policy_for(tiny_config())
    assert not fp32.loss_scaling and float(update_loss_scale(init_loss_scale(fp32), jnp.bool_(False), fp32).scale) == 1.0


@pytest.fixture(scope="module")
def setup(devices):
    windows, params = batches_and_params(tiny_config(*BASE), STEPS)
    return windows, params, make_mesh(MeshConfig(), devices[:1])


def _run(cfg, windows, params, mesh, track_params=False):
    """Step through ``windows``; each step's metrics, with ``unchanged`` (params equal before/after) if tracked."""
    trainer = Trainer(cfg, mesh)
    state, metrics = trainer.init_state(params), []
    for w in windows:
        before = jax.device_get(state.params) if track_params else None
        state, m = trainer.step(state, to_global_batch(w, mesh))
        m = jax.device_get(m)
        if track_params:
            after = jax.tree.leaves(jax.device_get(state.params))
            m["unchanged"] = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), after))
        metrics.append(m)
    return trainer, state, metrics


def test_fp16_overflow_skips_backs_off_grows_and_is_checkpointed(setup, tmp_path):
    windows, params, mesh = setup
    # 2**24 overflows float16 in the backward pass; the scale halves until it fits, then doubles every 2 good steps
    cfg = tiny_config(*BASE, "model.compute_dtype=float16", "train.loss_scale_init=16777216",
                      "train.loss_scale_period=2")
    trainer, state, ms = _run(cfg, windows[:12], params, mesh, track_params=True)
    skipped = [bool(m["skipped"]) for m in ms]
    assert skipped[0] and not all(skipped) and any(skipped[6:])  # overflows at first, and again after growing
    # a skipped step leaves the parameters as they were (the first applied update has lr 0: warmup)
    assert all(m["unchanged"] for m in ms if m["skipped"]) and sum(not m["unchanged"] for m in ms) >= 3
    want = (2.0**24, 0)
    for m in ms:
        assert float(m["loss_scale"]) == want[0]
        want = _reference_scale(*want, not m["skipped"], 2)
    assert (float(state.loss_scale.scale), int(state.loss_scale.good_steps)) == want
    assert all(np.isfinite(m["loss"]) for m in ms)  # the overflow is in the scaled backward pass only

    ckpt = Checkpointer(tmp_path / "run")
    trainer.save(ckpt, 12, state, 12)
    ckpt.wait()
    restored, position = trainer.restore(ckpt)
    ckpt.close()
    assert position == 12 and restored.loss_scale == LossScale(state.loss_scale.scale, state.loss_scale.good_steps)


@pytest.fixture(scope="module")
def fp32_metrics(setup):
    windows, params, mesh = setup
    return _run(tiny_config(*BASE), windows, params, mesh)[2]


def test_fp16_with_loss_scaling_follows_bf16_and_fp32(setup, fp32_metrics):
    """Sixteen steps from the same weights and batches.

    bfloat16 rounds matmul inputs to 8 significant bits (relative error up to 2**-9 = 2e-3), float16
    to 11 bits; the per-token losses average this rounding over 512 tokens, so the curves differ by
    a few 1e-4. A tolerance of 2e-3 (absolute, on losses of 6.8 to 8.3) is one bfloat16 rounding of
    the inputs and still 50x smaller than the typical per-step change of the loss, so a scaling bug
    (grads not unscaled before clipping, a skipped good step) shows up.
    """
    windows, params, mesh = setup
    curves = {"float32": np.array([float(m["loss"]) for m in fp32_metrics])}
    for dtype in ("bfloat16", "float16"):
        cfg = tiny_config(*BASE, f"model.compute_dtype={dtype}")
        _, _, ms = _run(cfg, windows, params, mesh)
        assert not any(m["skipped"] for m in ms)
        curves[dtype] = np.array([float(m["loss"]) for m in ms])
    assert curves["float16"][-1] < curves["float16"][0] - 1.0  # it learns
    np.testing.assert_allclose(curves["float16"], curves["bfloat16"], rtol=0, atol=2e-3)
    np.testing.assert_allclose(curves["float16"], curves["float32"], rtol=0, atol=2e-3)


# ---------------------------------------------------------------- optimizer numerics


def test_grad_accumulation_equals_the_full_batch(setup, fp32_metrics, devices):
    windows, params, mesh = setup
    cfg = tiny_config(*BASE)
    graphdef, _ = abstract_model(cfg.model)
    loss_and_grad = jax.value_and_grad(make_loss_fn(graphdef))
    batch = to_global_batch(windows[0], None)
    full = jax.jit(lambda p, b: accumulate_gradients(loss_and_grad, p, b, 1))(params, batch)
    accum = jax.jit(lambda p, b: accumulate_gradients(loss_and_grad, p, b, 4))(params, batch)
    np.testing.assert_allclose(accum[0], full[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(accum[1]), jax.tree.leaves(full[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    # and through the compiled step on a data x fsdp x tensor mesh (microbatches of 4 over 4 batch shards):
    # the loss and gradient norm of the single-device full-batch steps, three steps in
    sharded = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    _, _, m2 = _run(tiny_config(*BASE, "train.grad_accum_steps=2"), windows[:3], params, sharded)
    m1 = fp32_metrics[:3]
    np.testing.assert_allclose([m["loss"] for m in m2], [m["loss"] for m in m1], rtol=2e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in m2], [m["grad_norm"] for m in m1], rtol=1e-4)


def test_grad_accumulation_over_packed_documents_equals_the_full_batch(setup, devices):
    """Loss masks that differ between microbatches (documents of uneven lengths): the accumulated
    step still equals the full batch's mean over counted tokens."""
    from jaxlm.data import TokenStream

    _, params, mesh = setup
    cfg = tiny_config(*BASE)
    splits = load_splits(cfg.data, load_tokenizer())
    rng = np.random.default_rng(0)
    starts = np.unique(np.concatenate([[0], rng.integers(1, 4000, size=120)])).astype(np.int64)
    stream = TokenStream(splits.train.tokens[:4000], starts)
    loader = PackedLoader(stream, cfg.data.seq_len, cfg.train.batch_size, seed=3)
    batches = [loader.batch(i) for i in range(2)]
    mask = np.asarray(to_global_batch(batches[0], None)["loss_mask"])
    assert len({float(mask[i::4].sum()) for i in range(4)}) > 1, "masks must differ between microbatches (rows i, i+4)"
    _, _, full = _run(cfg, batches, params, mesh)
    _, _, accum = _run(tiny_config(*BASE, "train.grad_accum_steps=4"), batches, params, mesh)
    np.testing.assert_allclose([m["loss"] for m in accum], [m["loss"] for m in full], rtol=1e-6)
    np.testing.assert_allclose([m["grad_norm"] for m in accum], [m["grad_norm"] for m in full], rtol=1e-5)


def test_grad_accumulation_must_split_the_batch():
    with pytest.raises(ConfigError, match=r"train.batch_size=8 is not divisible by train.grad_accum_steps=3"):
        tiny_config("train.grad_accum_steps=3")


def test_weight_decay_skips_norms_and_embeddings():
    _, abstract = abstract_model(tiny_config("model.tie_embeddings=false").model)
    mask = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(abstract))}
    decayed = sorted(k for k, v in mask.items() if v)
    assert decayed == sorted(k for k in mask if any(w in k for w in ("'wq'", "'wk'", "'wv'", "'wo'", "'w_gate'", "'w_up'", "'w_down'")))
    assert len(decayed) == 7 and len(mask) == 7 + 3 + 2  # 3 norms, embed and lm_head
