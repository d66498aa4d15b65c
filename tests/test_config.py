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
        (["decode.top_p=0"], "config key 'decode.top_p' must be in (0, 1], got 0.0"),
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


def _numeric_keys():
    import dataclasses
    import typing

    from jaxlm.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        for f in dataclasses.fields(cls):
            base = typing.get_type_hints(cls)[f.name]
            if base in (int, float):
                keys.append((f"{section.name}.{f.name}", base))
    return keys


def test_every_numeric_field_is_checked_for_finiteness_and_size():
    """Walks every int/float field of every section: NaN and +-Inf (floats) and a size past int32
    (ints) are refused at load with one line naming the key and the value."""
    keys = _numeric_keys()
    assert len(keys) >= 45
    for key, typ in keys:
        bad = [".nan", ".inf", "-.inf"] if typ is float else ["3000000000", "-3000000000"]
        for value in bad:
            with pytest.raises(ConfigError) as e:
                tiny_config(f"{key}={value}")
            message = str(e.value)
            assert f"'{key}'" in message and "\n" not in message, message
            assert ("finite" in message) if typ is float else ("too large" in message), message


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.learning_rate=0", "'train.learning_rate' must be positive, got 0.0"),
        ("train.learning_rate=-1e-3", "'train.learning_rate' must be positive, got -0.001"),
        ("train.beta1=1", "'train.beta1' must be in [0, 1), got 1.0"),
        ("train.beta2=-0.1", "'train.beta2' must be in [0, 1), got -0.1"),
        ("train.eps=0", "'train.eps' must be positive"),
        ("train.weight_decay=-0.1", "'train.weight_decay' must be >= 0, got -0.1"),
        ("train.min_lr_ratio=1.5", "'train.min_lr_ratio' must be in [0, 1], got 1.5"),
        ("train.grad_clip=0", "'train.grad_clip' must be positive"),
        ("train.loss_scale_init=0.5", "'train.loss_scale_init' must be >= 1, got 0.5"),
        ("train.warmup_steps=-1", "'train.warmup_steps' must be >= 0, got -1"),
        ("model.rope_theta=0", "'model.rope_theta' must be positive"),
        ("model.norm_eps=-1e-5", "'model.norm_eps' must be positive"),
        ("model.vocab_size=0", "'model.vocab_size' must be positive, got 0"),
        ("data.val_fraction=1", "'data.val_fraction' must be in (0, 1), got 1.0"),
        ("data.seq_len=1", "'data.seq_len' must be >= 2, got 1"),
        ("decode.temperature=-1", "'decode.temperature' must be >= 0, got -1.0"),
        ("decode.top_k=-1", "'decode.top_k' must be >= 0, got -1"),
        ("checkpoint.keep=0", "'checkpoint.keep' must be positive, got 0"),
        ("mesh.data=-2", "'mesh.data' must be >= -1, got -2"),
        ("model.vocab_size=1e20", "'model.vocab_size' must be a whole number, got '1e20'"),
        ("train.batch_size=1e12", "'train.batch_size' must be a whole number, got '1e12' (at most 2147483647)"),
        ("train.steps=2.5", "'train.steps' must be a whole number, got 2.5"),
        ("train.steps=1e3", "'train.steps' must be a whole number, got '1e3' (write 1000)"),
        ("train.learning_rate=abc", "'train.learning_rate' must be float, got str 'abc'"),
        ("train.steps=[", "override 'train.steps=[': the value '[' does not parse"),
    ],
)
def test_out_of_range_values_give_one_line_naming_key_value_and_range(override, fragment):
    with pytest.raises(ConfigError) as e:
        tiny_config(override)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_floats_written_as_text_are_read():
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a float field takes it as the number."""
    assert tiny_config("train.learning_rate=1e-3").train.learning_rate == 1e-3


def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  steps: 3  # r\xe9sum\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 22 is 0xe9\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        load_config(tmp_path)
