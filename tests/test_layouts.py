"""The layout presets in configs/layouts merge over a model config and give the meshes they name."""

import pathlib

import pytest

from jaxlm.train import Trainer
from sharding.mesh import make_mesh
from tests.conftest import REPO, tiny_config

LAYOUTS = pathlib.Path(REPO) / "configs" / "layouts"
EXPECTED = {  # mesh shape on 8 devices (single: on 1)
    "single": {"stage": 1, "data": 1, "fsdp": 1, "sequence": 1, "tensor": 1},
    "dp": {"stage": 1, "data": 8, "fsdp": 1, "sequence": 1, "tensor": 1},
    "fsdp": {"stage": 1, "data": 1, "fsdp": 8, "sequence": 1, "tensor": 1},
    "fsdp_tp": {"stage": 1, "data": 1, "fsdp": 4, "sequence": 1, "tensor": 2},
    "fsdp_tp_cp": {"stage": 1, "data": 1, "fsdp": 2, "sequence": 2, "tensor": 2},
    "pp": {"stage": 2, "data": 1, "fsdp": 4, "sequence": 1, "tensor": 1},
}


def test_every_preset_is_checked():
    assert sorted(p.stem for p in LAYOUTS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_builds_its_mesh_and_a_trainer(name, devices):
    cfg = tiny_config(str(LAYOUTS / f"{name}.yaml"), "train.batch_size=16")
    mesh = make_mesh(cfg.mesh, devices[:1] if name == "single" else devices)
    assert dict(mesh.shape) == EXPECTED[name]
    Trainer(cfg, mesh)  # the batch and model divide the layout


def test_overrides_apply_in_order_after_a_preset():
    cfg = tiny_config(str(LAYOUTS / "fsdp_tp.yaml"), "mesh.tensor=1")
    assert cfg.mesh.tensor == 1 and cfg.mesh.fsdp == -1
