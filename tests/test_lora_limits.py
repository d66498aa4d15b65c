"""LoRA sizes refused before anything is allocated: the memory check counts the adapters (with their
gradients and optimizer moments) over a frozen base, and a rank above a targeted projection's
min(in, out) is refused, also when the model's sizes come from ``model.init_from``."""

import importlib
import math
import os

import jax
import pytest
from flax import nnx

import jaxlm
from jaxlm.build import abstract_model
from jaxlm.checkpoint import Checkpointer
from jaxlm.cli import main
from jaxlm.lora import abstract_lora_model
from jaxlm.metrics import count_lora_params, training_bytes
from sharding.mesh import make_mesh
from tests.conftest import REPO, tiny_config

TINY = os.path.join(REPO, "configs", "tiny.yaml")
TRAIN = importlib.import_module("jaxlm.train")  # the module (jaxlm.train is also the function)
ALL = "train.lora.targets=[q,k,v,o,gate,up,down]"


def _size(state) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def test_training_bytes_counts_the_adapters_by_hand():
    cfg = tiny_config("train.lora.rank=4", "train.lora.targets=[q,v,down]")
    m, lora = cfg.model, cfg.train.lora
    assert (m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.num_layers) == (64, 4, 2, 16, 192, 2)
    # A [in, 4] and B [4, out] per layer: q 64 -> 4*16, v 64 -> 2*16, down 192 -> 64; two layers
    adapters = 2 * 4 * ((64 + 64) + (64 + 32) + (192 + 64))
    assert adapters == 3840 == count_lora_params(m, lora)
    _, abstract, base = abstract_lora_model(m, lora)
    assert _size(abstract) == adapters  # the arrays the model really makes
    n_base = _size(abstract_model(m)[1])
    assert _size(base) == n_base
    logits = 2 * 4 * 3 * 64 * m.vocab_size  # float32 logits of a microbatch of 3 and their gradient
    # float32 base without gradients or moments; float32 adapters + gradients + two moments
    assert training_bytes(m, 3, 64, lora) == n_base * 4 + adapters * (4 + 4 + 8) + logits
    bf16 = tiny_config("train.lora.rank=4", "train.lora.targets=[q,v,down]", "train.lora.base_dtype=bfloat16")
    assert training_bytes(m, 3, 64, bf16.train.lora) == n_base * 2 + adapters * 16 + logits
    assert training_bytes(m, 3, 64) == n_base * (4 + 4 + 8) + logits  # full fine-tuning, as before


def test_a_lora_run_whose_adapters_do_not_fit_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = ["train", TINY, "train.lora.rank=32", ALL, f"checkpoint.dir={run}"]
    cfg = tiny_config(*argv[2:])
    m = cfg.model
    adapters = 2 * 32 * (2 * 64 + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 192) + (192 + 64))
    base = _size(abstract_model(m)[1]) * 4
    logits = 2 * 4 * cfg.train.batch_size * cfg.data.seq_len * m.vocab_size
    need = base + adapters * 16 + logits
    monkeypatch.setattr(TRAIN, "memory_capacity", lambda devices: need - 1)  # fits but for 1 byte of it
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "train.lora.rank=32 on q,k,v,o,gate,up,down and train.batch_size=8 need at least" in err, err
    assert "adapters, their gradients and optimizer moments" in err and "lower train.lora.rank" in err, err
    assert not run.exists()  # nothing written, not even the tokenizer
    monkeypatch.setattr(TRAIN, "memory_capacity", lambda devices: need)
    TRAIN._check_fits(cfg, make_mesh(cfg.mesh))  # exactly enough: accepted


def test_a_rank_above_the_init_from_models_projection_is_refused(tmp_path, capsys):
    """The defaults (embed_dim 256, k/v 128 outputs) allow rank 64; the tiny source's v has 32 outputs."""
    src_cfg = tiny_config()
    ckpt = Checkpointer(tmp_path / "src", src_cfg.checkpoint)
    ckpt.save(1, nnx.state(jaxlm.build_model(src_cfg.model, seed=0)), None, 0, src_cfg)
    ckpt.wait()
    ckpt.close()
    config = tmp_path / "ft.yaml"
    config.write_text(f"model:\n  init_from: {tmp_path / 'src'}\ntrain:\n  lora:\n    rank: 64\n")
    rc = main(["train", str(config), f"checkpoint.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "train.lora.rank=64 is larger than the 'v' projection allows (64 inputs, 32 outputs)" in err, err
    assert "set train.lora.rank=32 or less" in err, err
    assert not (tmp_path / "run").exists()


def test_a_rank_the_init_from_model_allows_is_not_judged_by_the_default_sizes(tmp_path):
    """Rank 160 exceeds the defaults' k/v (128 outputs) but not a source whose k/v have 192."""
    src_cfg = tiny_config("model.embed_dim=256", "model.num_heads=8", "model.num_kv_heads=8", "model.head_dim=24",
                          "model.mlp_dim=256")
    ckpt = Checkpointer(tmp_path / "src", src_cfg.checkpoint)
    ckpt.save(1, nnx.state(jaxlm.build_model(src_cfg.model, seed=0)), None, 0, src_cfg)
    ckpt.wait()
    ckpt.close()
    cfg = jaxlm.load_config(None, [f"model.init_from={tmp_path / 'src'}", "train.lora.rank=160", ALL])
    resolved = TRAIN.pretrained.resolve_init_from(cfg)
    TRAIN.check_lora(resolved.train.lora, resolved.model)  # what jaxlm.train checks: it fits this model
    with pytest.raises(jaxlm.ConfigError, match="larger than the 'k' projection allows"):
        TRAIN.check_lora(resolved.train.lora, jaxlm.load_config().model)  # the defaults would refuse it
