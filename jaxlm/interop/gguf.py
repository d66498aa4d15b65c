"""llama.cpp GGUF files (``llama`` and ``qwen2`` architectures): weights, tokenizer, chat template.

    model, cfg = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # dequantised to float32
    tokenizer = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")

Quantised tensors (Q4_1, Q8_0, ...) are dequantised by the ``gguf`` package, one shard's rows at a
time. llama.cpp's converter interleaves the two RoPE halves of every Llama Q and K head
(:func:`llama_cpp_permute`); :func:`unpermute` undoes it so the rows are back in Hugging Face order.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from jax.sharding import Mesh
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxlm.config import Config, ConfigError, DataConfig, ModelConfig, validate
from jaxlm.errors import InteropError
from jaxlm.interop.hf import _mesh_config
from jaxlm.interop.layout import build_state
from jaxlm.model import Transformer

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_CONTROL = 3  # llama.cpp token type of special (control) tokens


def llama_cpp_permute(w_RxC: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within each head, row ``t * D/2 + j`` moves to ``j * 2 + t``."""
    return w_RxC.reshape(n_head, 2, w_RxC.shape[0] // n_head // 2, *w_RxC.shape[1:]).swapaxes(1, 2).reshape(w_RxC.shape)


def unpermute(w_RxC: np.ndarray, head_dim: int) -> np.ndarray:
    """Inverse of :func:`llama_cpp_permute` for rows holding whole heads of ``head_dim``."""
    return w_RxC.reshape(-1, head_dim // 2, 2, *w_RxC.shape[1:]).swapaxes(1, 2).reshape(w_RxC.shape)


def _reader(path: str | pathlib.Path):
    import gguf

    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"GGUF file '{p}' does not exist")
    try:
        return gguf.GGUFReader(str(p))
    except (ValueError, OSError) as e:
        raise InteropError(f"'{p}' is not a readable GGUF file: {e}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def model_config_from_gguf(reader: Any, dtype: str = "float32") -> ModelConfig:
    """The :class:`ModelConfig` described by a GGUF file's metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise InteropError(f"GGUF architecture '{arch}' is not supported; jaxlm reads llama and qwen2")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names or _field(reader, f"{arch}.rope.scaling.type", "none") not in ("none", None):
        raise InteropError("GGUF RoPE scaling is not supported; convert the Hugging Face checkpoint instead")
    embed, heads = int(_field(reader, f"{arch}.embedding_length")), int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", embed // heads))
    if int(_field(reader, f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise InteropError("GGUF partial rotary embeddings (rope.dimension_count != head_dim) are not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    return ModelConfig(
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        embed_dim=embed,
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        mlp_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        param_dtype=dtype,
        compute_dtype=dtype,
    )


def from_gguf(path: str | pathlib.Path, *, mesh: Mesh | None = None, dtype: str = "float32") -> tuple[Transformer, Config]:
    """Load a GGUF file's weights, dequantised to ``dtype``, sharded onto ``mesh``. Returns ``(model, config)``."""
    import gguf

    reader = _reader(path)
    cfg_model = model_config_from_gguf(reader, dtype)
    permute = _field(reader, "general.architecture") == "llama"
    tensors = {t.name: t for t in reader.tensors}
    hf_to_gguf = dict(_GLOBAL_NAMES)
    for i in range(cfg_model.num_layers):
        hf_to_gguf.update({f"model.layers.{i}.{k}": f"blk.{i}.{v}" for k, v in _LAYER_NAMES.items()})

    def read(name: str, slices: tuple[slice, ...]) -> np.ndarray:
        gname = hf_to_gguf[name]
        if gname not in tensors:
            raise InteropError(f"tensor '{gname}' is missing from the GGUF file '{path}'")
        t = tensors[gname]
        rows = gguf.quants.dequantize(t.data[slices[0]], t.tensor_type).astype(np.float32)
        rows = rows.reshape(rows.shape[0], -1) if len(slices) == 2 else rows.reshape(-1)
        if permute and gname.endswith(("attn_q.weight", "attn_k.weight")):
            rows = unpermute(rows, cfg_model.head_dim)
        return rows[(slice(None), *slices[1:])]

    model = build_state(cfg_model, read, mesh)
    return model, validate(Config(model=cfg_model, mesh=_mesh_config(mesh), data=DataConfig()))


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "gpt2":
        return byte_level
    if pre == "smollm":  # StarCoder-style: every digit alone, then GPT-2 byte-level splitting
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise InteropError(f"GGUF tokenizer pre-tokenizer '{pre}' is not supported; jaxlm reads gpt2 and smollm")


def gguf_tokenizer(path: str | pathlib.Path) -> Tokenizer:
    """The byte-level BPE tokenizer embedded in a GGUF file, as a ``tokenizers.Tokenizer``."""
    reader = _reader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InteropError(f"GGUF tokenizer model '{kind}' is not supported; jaxlm reads byte-level BPE (gpt2)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:  # encode() adds BOS, as llama.cpp does
        bos_token = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, int(bos))])
    return tok


_SPECIAL_IDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}  # tokenizer_config key -> GGUF key
_END_IDS = ("eos", "eot", "eom")  # GGUF ids that end generation (end of text, of turn, of message)


def write_tokenizer_files(path: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write a GGUF file's tokenizer as ``tokenizer.json`` + ``tokenizer_config.json`` (chat template,
    BOS/EOS/UNK/PAD) + ``generation_config.json`` (``eos_token_id``: the file's ``eos_token_id``,
    ``eot_token_id`` and ``eom_token_id``) into ``out_dir``, the way a Hugging Face model directory
    holds them. Returns tokenizer.json."""
    reader = _reader(path)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    gguf_tokenizer(path).save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {}
    for key, gguf_key in _SPECIAL_IDS.items():
        token_id = _field(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            config[f"{key}_token"] = tokens[int(token_id)]
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation: dict[str, Any] = {}
    if _field(reader, "tokenizer.ggml.bos_token_id") is not None:
        generation["bos_token_id"] = int(_field(reader, "tokenizer.ggml.bos_token_id"))
    ends = sorted({int(_field(reader, f"tokenizer.ggml.{k}_token_id")) for k in _END_IDS
                   if _field(reader, f"tokenizer.ggml.{k}_token_id") is not None})
    if ends:
        generation["eos_token_id"] = ends[0] if len(ends) == 1 else ends
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out / "tokenizer.json"
