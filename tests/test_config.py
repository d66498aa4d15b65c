import pytest

from jaxlm.config import ConfigError, load_config
from sharding.mesh import make_mesh
from tests.conftest import REPO, tiny_config


def test_yaml_and_overrides_are_typed():
    cfg = tiny_config("train.steps=7", "model.tie_embeddings=false", "train.learning_rate=1")
    assert cfg.train.steps == 7
    assert cfg.model.tie_embeddings is False
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == 1.0
    assert cfg.model.embed_dim == 64  # from the YAML file


def test_all_shipped_configs_load():
    import glob

    paths = sorted(glob.glob(f"{REPO}/configs/*.yaml"))
    assert paths
    for p in paths:
        load_config(p)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.num_layer=3"], "unknown config key 'model.num_layer'; did you mean 'num_layers'?"),
        (["modle.num_layers=3"], "unknown config key 'modle'; did you mean 'model'?"),
        (["train.steps=ten"], "config key 'train.steps' must be int"),
        (["model.tie_embeddings=3"], "config key 'model.tie_embeddings' must be bool"),
        (["model.num_heads=6", "model.num_kv_heads=4"], "model.num_heads=6 is not divisible by model.num_kv_heads=4"),
        (["mesh.tensor=4", "model.num_kv_heads=2"], "model.num_kv_heads=2 is not divisible by mesh.tensor=4"),
        (["model.remat=some"], "config key 'model.remat' is 'some'; choose one of"),
        (["model.compute_dtype=float64"], "config key 'model.compute_dtype'"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "only one of mesh.stage, mesh.data, mesh.fsdp, mesh.sequence, mesh.tensor may be -1"),
        (["train.steps"], "override 'train.steps' must look like section.key=value"),
        (["decode.top_p=0"], "decode needs"),
        (["mesh.sequence=4", "data.seq_len=36"], "data.seq_len=36 must be a multiple of 2 * mesh.sequence=8"),
        (["mesh.stage=3"], "model.num_layers=2 is not divisible by mesh.stage=3"),
        (["model.pipeline_microbatches=0"], "config key 'model.pipeline_microbatches' must be positive"),
        (["model.context_impl=rings"], "config key 'model.context_impl' is 'rings'; choose one of all_gather, ring"),
        (["train.optimizer=sgd"], "config key 'train.optimizer' is 'sgd'; choose one of adamw, lion, adafactor"),
        (["model.attention_impl=flash"], "config key 'model.attention_impl' is 'flash'; choose one of auto, xla, pallas, cudnn"),
    ],
)
def test_bad_config_gives_one_line_error(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        tiny_config(*overrides)
    message = str(e.value)
    assert fragment in message
    assert "\n" not in message


def test_attention_impl_choices_load():
    for impl in ("auto", "xla", "pallas", "cudnn"):
        assert tiny_config(f"model.attention_impl={impl}").model.attention_impl == impl


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "mesh, fragment",
    [
        (["mesh.data=3", "mesh.fsdp=1", "mesh.tensor=1"], "mesh stage*data*fsdp*sequence*tensor = 1*3*1*1*1 = 3 but there are 8 devices"),
        (["mesh.data=3", "mesh.fsdp=-1"], "3 does not divide 8"),
    ],
)
def test_mesh_that_does_not_fit_the_devices(devices, mesh, fragment):
    cfg = tiny_config(*mesh)
    with pytest.raises(ConfigError) as e:
        make_mesh(cfg.mesh, devices)
    assert fragment in str(e.value) and "\n" not in str(e.value)
