"""Training gives the same numbers on every mesh layout, and it learns."""

import dataclasses

import jax
import numpy as np
import pytest

import jaxlm
from jaxlm.config import MeshConfig
from jaxlm.data import to_global_batch
from jaxlm.train import Trainer, cross_entropy
from sharding.mesh import make_mesh
from tests.conftest import batches_and_params, tiny_config

# 8 query and 8 kv heads, so every axis (tensor=8 included) divides the model
MESH_CFG = ("model.num_heads=8", "model.num_kv_heads=8", "model.head_dim=8", "train.steps=3", "train.warmup_steps=1")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(*MESH_CFG)
    windows, params = batches_and_params(cfg, 3)
    return cfg, windows, params


@pytest.fixture(scope="module")
def single_device_losses(setup, devices):
    cfg, windows, params = setup
    return _losses(cfg, windows, params, make_mesh(MeshConfig(), devices[:1]))[0]


def _losses(cfg, windows, params, mesh):
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state(params)
    losses = []
    for w in windows:
        state, metrics = trainer.step(state, to_global_batch(w, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


def test_cross_entropy_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 3
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
    want = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(targets)[..., None], -1))
    np.testing.assert_allclose(cross_entropy(logits, targets), want, rtol=1e-6)


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        MeshConfig(data=8, fsdp=1, tensor=1),
        MeshConfig(data=1, fsdp=8, tensor=1),
        MeshConfig(data=1, fsdp=4, tensor=2),
        MeshConfig(data=1, fsdp=1, tensor=8),
        MeshConfig(data=2, fsdp=2, tensor=2),
    ],
    ids=["data8", "fsdp8", "fsdp4_tensor2", "tensor8", "data2_fsdp2_tensor2"],
)
def test_three_steps_same_losses_on_every_mesh(setup, single_device_losses, devices, mesh_cfg):
    cfg, windows, params = setup
    single = single_device_losses
    assert single[2] < single[0]
    sharded, _ = _losses(cfg, windows, params, make_mesh(mesh_cfg, devices))
    np.testing.assert_allclose(sharded, single, rtol=2e-5)


def test_notebook_path_learns_on_one_device(devices):
    cfg = tiny_config("train.steps=40", "train.eval_every=40")
    result = jaxlm.train(cfg, mesh=make_mesh(MeshConfig(), devices[:1]), log=lambda _: None)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert result.val_loss_after < result.val_loss_before - 1.0
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "step"} <= set(result.history[0])
    assert result.history[0]["lr"] == 0.0 and result.history[5]["lr"] == pytest.approx(cfg.train.learning_rate, rel=1e-6)


def test_batch_must_divide_data_parallel_size(devices):
    cfg = tiny_config("train.batch_size=6")
    with pytest.raises(jaxlm.ConfigError, match=r"train.batch_size=6 is not divisible by the data-parallel size 8"):
        Trainer(cfg, make_mesh(MeshConfig(fsdp=8), devices))


def test_bf16_compute_trains_like_fp32(setup, single_device_losses, devices):
    cfg, windows, params = setup
    bf16 = cfg.replace(model=dataclasses.replace(cfg.model, compute_dtype="bfloat16"))
    losses, state = _losses(bf16, windows, params, make_mesh(MeshConfig(), devices[:1]))
    # master weights stay float32; the losses follow float32's within bf16 rounding
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-2)


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(), MeshConfig(data=2, fsdp=2, tensor=2)], ids=["one_device", "data2_fsdp2_tensor2"])
def test_pallas_attention_in_the_train_step_matches_xla(setup, single_device_losses, devices, mesh_cfg):
    """The flash kernel (Pallas interpreter on CPU), per shard under shard_map, inside the jitted step."""
    cfg, windows, params = setup
    pallas = cfg.replace(model=dataclasses.replace(cfg.model, attention_impl="pallas"))
    mesh = make_mesh(mesh_cfg, devices[:1] if mesh_cfg == MeshConfig() else devices)
    losses, _ = _losses(pallas, windows[:2], params, mesh)
    np.testing.assert_allclose(losses, single_device_losses[:2], rtol=2e-5)


@pytest.mark.parametrize(
    "mesh_cfg,context_impl",
    [
        (MeshConfig(data=1, fsdp=2, sequence=4, tensor=1), "all_gather"),
        (MeshConfig(data=1, fsdp=2, sequence=4, tensor=1), "ring"),
        (MeshConfig(data=2, fsdp=1, sequence=2, tensor=2), "ring"),
    ],
    ids=["fsdp2_seq4_all_gather", "fsdp2_seq4_ring", "data2_seq2_tensor2_ring"],
)
def test_context_parallel_training_matches_one_device(setup, single_device_losses, devices, mesh_cfg, context_impl):
    """The sequence split over devices (load-balanced order, ring or all-gather attention)."""
    cfg, windows, params = setup
    cp = cfg.replace(model=dataclasses.replace(cfg.model, context_impl=context_impl))
    losses, _ = _losses(cp, windows, params, make_mesh(mesh_cfg, devices))
    np.testing.assert_allclose(losses, single_device_losses, rtol=2e-5)


@pytest.mark.parametrize(
    "mesh_cfg,impl",
    [(MeshConfig(stage=2, fsdp=4), "xla"), (MeshConfig(stage=2, data=2, fsdp=1, tensor=2), "pallas")],
    ids=["stage2_fsdp4", "stage2_data2_tensor2_pallas"],
)
def test_pipeline_training_matches_one_device(setup, single_device_losses, devices, mesh_cfg, impl):
    """Two stages: the layers split over stages (GPipe over 2 microbatches) inside FSDP or data x
    tensor, with the attention kernel per shard inside each stage."""
    cfg, windows, params = setup
    pp = cfg.replace(model=dataclasses.replace(cfg.model, pipeline_microbatches=2, attention_impl=impl))
    n = 3 if impl == "xla" else 2
    losses, _ = _losses(pp, windows[:n], params, make_mesh(mesh_cfg, devices))
    np.testing.assert_allclose(losses, single_device_losses[:n], rtol=2e-5)


def test_bfloat16_pipeline_training_matches_one_device_in_bfloat16(setup, devices):
    """bfloat16 compute over two stages inside FSDP: the all-reduces over stages run in float32
    (XLA's CPU compiler aborted on them in bfloat16); losses and gradient norms follow one
    device's in bfloat16 to within its rounding."""
    cfg, windows, params = setup
    bf16 = cfg.replace(model=dataclasses.replace(cfg.model, compute_dtype="bfloat16", pipeline_microbatches=2))

    def run(mesh):
        trainer = Trainer(bf16, mesh)
        state, out = trainer.init_state(params), []
        for w in windows:
            state, metrics = trainer.step(state, to_global_batch(w, mesh))
            out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        return np.array(out)

    single = run(make_mesh(MeshConfig(), devices[:1]))
    piped = run(make_mesh(MeshConfig(stage=2, fsdp=4), devices))
    np.testing.assert_allclose(piped, single, rtol=2e-3)


def test_four_stage_pipeline_with_tensor_parallelism_matches_one_device(devices):
    cfg = tiny_config(*MESH_CFG, "model.num_layers=4", "model.pipeline_microbatches=4")
    windows, params = batches_and_params(cfg, 3, model_seed=1)
    single, _ = _losses(cfg, windows, params, make_mesh(MeshConfig(), devices[:1]))
    piped, _ = _losses(cfg, windows, params, make_mesh(MeshConfig(stage=4, fsdp=1, tensor=2), devices))
    np.testing.assert_allclose(piped, single, rtol=2e-5)
    with pytest.raises(jaxlm.ConfigError, match="must be a multiple of model.pipeline_microbatches=4"):
        Trainer(cfg, make_mesh(MeshConfig(stage=2, fsdp=4), devices))


@pytest.mark.parametrize("optimizer", ["lion", "adafactor"])
def test_other_optimizers_learn_and_shard_like_one_device(setup, devices, optimizer):
    """Lion and Adafactor (factored moments shaped unlike their parameters) on one device and FSDP x TP."""
    cfg, windows, params = setup
    opt = cfg.replace(train=dataclasses.replace(cfg.train, optimizer=optimizer, learning_rate=1e-3))
    single, _ = _losses(opt, windows, params, make_mesh(MeshConfig(), devices[:1]))
    assert single[2] < single[0]
    sharded, _ = _losses(opt, windows, params, make_mesh(MeshConfig(fsdp=4, tensor=2), devices))
    np.testing.assert_allclose(sharded, single, rtol=2e-5)
