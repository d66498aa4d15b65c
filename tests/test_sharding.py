"""Mesh construction, the rules table, and parameter / optimizer-state layouts under FSDP and TP."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import MeshConfig
from jaxlm.train import Trainer
from sharding.mesh import make_mesh
from sharding.rules import LOGICAL_RULES, describe_rules, logical_spec
from tests.conftest import tiny_config


def test_fill_axis_and_axis_types(devices):
    mesh = make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2), devices)
    assert dict(mesh.shape) == {"stage": 1, "data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = make_mesh(MeshConfig(), devices[:1])
    assert dict(one.shape) == {"stage": 1, "data": 1, "fsdp": 1, "sequence": 1, "tensor": 1}


def test_rules_table_maps_names_to_mesh_axes():
    assert logical_spec(("batch", "seq", "act_embed")) == jax.sharding.PartitionSpec(("data", "fsdp"), "sequence", None)
    assert logical_spec(("layers", "embed", "heads", "head_dim")) == jax.sharding.PartitionSpec("stage", "fsdp", "tensor", None)
    text = describe_rules()
    assert len(text.splitlines()) == len(LOGICAL_RULES) and "embed" in text
    with pytest.raises(KeyError, match="no rule"):
        logical_spec(("nonsense",))


def _shard_shapes(tree):
    return {
        jax.tree_util.keystr(p): (x.shape, x.addressable_shards[0].data.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(x, "addressable_shards")
    }


def test_fsdp_splits_every_large_parameter_and_both_adam_moments(devices):
    cfg = tiny_config("mesh.fsdp=8")
    mesh = make_mesh(cfg.mesh, devices)
    trainer = Trainer(cfg, mesh)
    from jaxlm.build import build_model

    state = trainer.init_state(nnx.state(build_model(cfg.model, mesh)))
    params = _shard_shapes(state.params)
    large = {k: v for k, v in params.items() if "norm" not in k}
    assert len(large) == 8  # embed + 7 stacked weights
    for name, (full, shard) in large.items():
        assert np.prod(full) == 8 * np.prod(shard), name
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for moment in (adam.mu, adam.nu):
        shapes = _shard_shapes(moment)
        for name, (full, shard) in shapes.items():
            if "norm" not in name:
                assert np.prod(full) == 8 * np.prod(shard), name
    assert sum("norm" not in n for n in _shard_shapes(adam.mu)) == 8


def test_tensor_parallel_layout(devices):
    cfg = tiny_config("mesh.fsdp=2", "mesh.tensor=4", "model.num_kv_heads=4")
    mesh = make_mesh(cfg.mesh, devices)
    from jaxlm.build import build_model

    m = build_model(cfg.model, mesh)
    wq = m.blocks.attn.wq[...]
    L, E, H, D = wq.shape
    assert wq.sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (L, E // 2, H // 4, D)
    w_down = m.blocks.mlp.w_down[...]
    assert w_down.addressable_shards[0].data.shape == (L, cfg.model.mlp_dim // 4, E // 2)


def test_indivisible_parameter_dim_is_a_clear_error(devices):
    from jaxlm.build import build_model
    from jaxlm.config import ConfigError

    cfg = tiny_config("model.embed_dim=60")  # 60 is not divisible by fsdp=8
    with pytest.raises(ConfigError, match=r"parameter '.*' dim .* \('embed', size 60\) is not divisible"):
        build_model(cfg.model, make_mesh(MeshConfig(fsdp=8), devices))
