"""Checkpoints: reshard on restore, bit-identical resume, and refusals that keep saved data intact."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import ConfigError, MeshConfig
from jaxlm.data import tokenizer_file
from jaxlm.errors import CheckpointError
from sharding.mesh import make_mesh
from tests.conftest import file_hashes, tiny_config

QUIET = dict(log=lambda _: None)


def _run_cfg(directory, *extra):
    return tiny_config(
        "train.steps=6", "train.warmup_steps=2", "train.eval_every=100", "train.eval_batches=1",
        f"checkpoint.dir={directory}", "checkpoint.save_every=3", "checkpoint.keep=3", *extra,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, devices):
    d = tmp_path_factory.mktemp("full")
    mesh = make_mesh(MeshConfig(fsdp=8), devices)
    return d, jaxlm.train(_run_cfg(d), mesh=mesh, **QUIET)


def test_resume_after_interruption_is_bit_identical(uninterrupted, tmp_path, devices):
    full_dir, full = uninterrupted
    mesh = make_mesh(MeshConfig(fsdp=8), devices)
    # a run that was killed after its step-3 checkpoint: copy the run and drop step 6
    shutil.copytree(full_dir, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "6")
    resumed = jaxlm.train(_run_cfg(tmp_path / "run"), mesh=mesh, **QUIET)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[3:]]
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.model)), jax.tree.leaves(nnx.state(full.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    meta = Checkpointer(tmp_path / "run", create=False).read_meta()
    assert meta["step"] == 6 and meta["data_position"] == 6


@pytest.mark.parametrize("target", [MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(tensor=2, fsdp=-1), None])
def test_restore_onto_another_mesh(uninterrupted, devices, target):
    full_dir, full = uninterrupted
    mesh = make_mesh(MeshConfig(), devices[:1]) if target is None else make_mesh(target, devices)
    model, cfg = jaxlm.restore(full_dir, mesh=mesh)
    assert cfg.model == full.model.cfg
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(full.model))):
        assert a.sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wq = model.blocks.attn.wq[...]
    assert wq.sharding.spec[2] == "tensor"


def test_incompatible_run_directory_is_refused_and_untouched(uninterrupted, tmp_path, devices):
    full_dir, _ = uninterrupted
    shutil.copytree(full_dir, tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match=r"holds a run with a different model \(model.embed_dim differ\)"):
        jaxlm.train(_run_cfg(tmp_path / "run", "model.embed_dim=32"), mesh=make_mesh(MeshConfig(), devices[:1]), **QUIET)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_resuming_with_another_tokenizer_is_refused_and_untouched(uninterrupted, tmp_path, devices):
    """The run's token ids came from the embedded tokenizer: one with fewer merges maps text to other
    ids, so resuming under it is refused (the checkpoints record the tokenizer file's sha256)."""
    full_dir, _ = uninterrupted
    shutil.copytree(full_dir, tmp_path / "run")
    spec = json.loads(tokenizer_file().read_text(encoding="utf-8"))
    spec["model"]["merges"] = spec["model"]["merges"][:-50]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    before = file_hashes(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"holds a run it cannot continue: the run was trained with another tokenizer "
                                          r"\(the embedded tokenizer\); set data.tokenizer_path back to '' \(the embedded"):
        jaxlm.train(_run_cfg(tmp_path / "run", f"data.tokenizer_path={tmp_path / 'tokenizer.json'}"),
                    mesh=make_mesh(MeshConfig(), devices[:1]), **QUIET)
    assert file_hashes(tmp_path / "run") == before


def test_a_run_whose_tokenizer_file_changed_is_refused_for_decoding_and_resuming(tmp_path, devices):
    """The run records its tokenizer file's sha256; edited afterwards, the file maps ids to other text:
    restoring the run (generate, serve) and resuming it say so in one line and change nothing."""
    tok = tmp_path / "tokenizer.json"
    shutil.copy(tokenizer_file(), tok)
    run = tmp_path / "run"
    cfg = tiny_config("train.steps=2", "train.warmup_steps=1", "train.eval_every=100", "train.eval_batches=1",
                      f"checkpoint.dir={run}", f"data.tokenizer_path={tok}")
    mesh = make_mesh(MeshConfig(), devices[:1])
    jaxlm.train(cfg, mesh=mesh, **QUIET)
    jaxlm.restore(run, mesh=mesh)  # unchanged: restores
    spec = json.loads(tok.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped
    tok.write_text(json.dumps(spec), encoding="utf-8")
    before = file_hashes(run)
    changed = rf"the tokenizer file '{tok}' has changed since the run was trained \(its sha256 is not the recorded one\)"
    with pytest.raises(ConfigError, match=rf"^the run in '{run}' cannot be used: {changed}; put back the file it was trained with$"):
        jaxlm.restore(run, mesh=mesh)
    with pytest.raises(ConfigError, match=rf"holds a run it cannot continue: {changed}; put back the file it was trained "
                                          r"with, use a new checkpoint.dir, or --force to set it aside$"):
        jaxlm.train(tiny_config("train.steps=4", "train.warmup_steps=1", f"checkpoint.dir={run}", f"data.tokenizer_path={tok}"),
                    mesh=mesh, **QUIET)
    assert file_hashes(run) == before


def test_missing_and_corrupt_checkpoints(uninterrupted, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        jaxlm.restore(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint found"):
        jaxlm.restore(tmp_path / "empty")
    full_dir, _ = uninterrupted
    shutil.copytree(full_dir, tmp_path / "run")
    with pytest.raises(ConfigError, match="checkpoint step 5 not found"):
        jaxlm.restore(tmp_path / "run", step=5)
    shutil.rmtree(tmp_path / "run" / "6" / "params")
    with pytest.raises(CheckpointError, match="checkpoint step 6 .* cannot be restored"):
        jaxlm.restore(tmp_path / "run", step=6)
    said = []
    model, _ = jaxlm.restore(tmp_path / "run", log=said.append)  # the newest readable step, said in one line
    assert len(said) == 1 and said[0].startswith("warning: checkpoint step 6 ") and "using step 3" in said[0]
    at_3, _ = jaxlm.restore(tmp_path / "run", step=3)
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(at_3))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "run" / "6").is_dir()  # a reader changes nothing
    shutil.rmtree(tmp_path / "run" / "3" / "params")
    with pytest.raises(CheckpointError, match="^no checkpoint in .* can be restored"):
        jaxlm.restore(tmp_path / "run")
