"""Hugging Face checkpoints (Llama, Mistral, Qwen2): ``config.json`` + safetensors in and out.

    model, cfg = from_hf("path/to/hf_dir", mesh=mesh)        # parameters born sharded on ``mesh``
    to_hf(model, cfg, "path/to/out_dir")                     # config.json + model.safetensors

Loading memory-maps the safetensors files (one file or a sharded ``model.safetensors.index.json``)
and reads, for every device, only the rows of each tensor its shard covers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import warnings
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read BF16 tensors)
import numpy as np
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxlm.config import Config, ConfigError, DataConfig, MeshConfig, ModelConfig, validate
from jaxlm.errors import InteropError
from jaxlm.interop.layout import build_state, hf_tensor_names, to_hf_tensors
from jaxlm.model import Transformer

SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja")


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either the transformers 5 (``rope_parameters``) or 4 (``rope_scaling``) form."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    elif rope_type not in ("default", None):
        raise InteropError(f"RoPE type '{rope_type}' is not supported; jaxlm supports default and llama3 RoPE")
    return out


def model_config_from_hf(hf: dict[str, Any], *, tie_default: bool, dtype: str = "float32") -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face ``config.json`` dict (Llama, Mistral or Qwen2)."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise InteropError(f"model_type '{kind}' is not supported; jaxlm reads {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise InteropError(f"hidden_act '{hf['hidden_act']}' is not supported; jaxlm's MLP is SwiGLU (silu)")
    if hf.get("mlp_bias"):
        raise InteropError("mlp_bias=true is not supported; jaxlm's MLP has no biases")
    if kind != "qwen2" and hf.get("attention_bias"):
        raise InteropError("attention_bias=true (biases on q/k/v and o) is not supported; only Qwen2's q/k/v biases are")
    window = hf.get("sliding_window") if kind == "mistral" or hf.get("use_sliding_window") else None
    if window:
        warnings.warn(
            f"{kind} sliding_window={window} is not implemented: jaxlm attends over the full context, "
            f"which matches the checkpoint only for sequences up to {window} tokens",
            stacklevel=3,
        )
    heads = int(hf["num_attention_heads"])
    tie = hf.get("tie_word_embeddings")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        embed_dim=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=tie_default if tie is None else bool(tie),
        qkv_bias=kind == "qwen2",
        param_dtype=dtype,
        compute_dtype=dtype,
        **_rope_fields(hf),
    )


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` dict for ``cfg`` (Qwen2 when it has q/k/v biases, else Llama).

    RoPE is written as ``rope_theta`` at top level plus ``rope_scaling`` (null, or the llama3 dict),
    the form transformers 4.x reads and 5.x converts into its ``rope_parameters``: both read the
    same model (``tests/test_fidelity.py`` checks 5.x live and 4.x against a saved fixture).
    """
    kind = "qwen2" if cfg.qkv_bias else "llama"
    scaling: dict[str, Any] | None = None
    if cfg.rope_scaling == "llama3":
        scaling = dict(
            rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_len,
        )
    out = {
        "architectures": [SUPPORTED[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "torch_dtype": cfg.param_dtype,
    }
    if kind == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    return out


def _safe_open(file: pathlib.Path):
    """``safe_open(file)``, a truncated or garbled file being an :class:`InteropError`."""
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InteropError(f"'{file}' is not a readable safetensors file ({reason}); download or write it again") from None


def _tensor_files(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise InteropError(f"'{path}' has neither model.safetensors nor model.safetensors.index.json")
    with _safe_open(single) as f:
        return {name: single for name in f.keys()}


EMBED = "model.embed_tokens.weight"


def _ignored_buffers(files) -> set[str]:  # buffers transformers also skips: RoPE frequencies it recomputes
    return {n for n in files if n.endswith("rotary_emb.inv_freq")}


def _same_tensor(files: dict[str, pathlib.Path], a: str, b: str, rows: int = 8192) -> bool:
    """Whether tensors ``a`` and ``b`` hold the same values (compared a block of rows at a time)."""
    with _safe_open(files[a]) as fa, _safe_open(files[b]) as fb:
        sa, sb = fa.get_slice(a), fb.get_slice(b)
        if sa.get_shape() != sb.get_shape():
            return False
        n = sa.get_shape()[0]
        return all(np.array_equal(sa[i:min(i + rows, n)], sb[i:min(i + rows, n)]) for i in range(0, n, rows))


def _mesh_config(mesh: Mesh | None) -> MeshConfig:
    if mesh is None:
        return MeshConfig(fsdp=1)
    shape = dict(mesh.shape)
    return MeshConfig(**{k: int(shape.get(k, 1)) for k in ("stage", "data", "fsdp", "sequence", "tensor")})


def hf_model_config(
    path: str | pathlib.Path, *, dtype: str = "float32", stacklevel: int = 2
) -> tuple[ModelConfig, dict[str, pathlib.Path]]:
    """The :class:`ModelConfig` of a Hugging Face directory and its tensor -> file map, reading no weights
    (but the ``lm_head`` and embedding rows when they must be compared to decide tying)."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"'{path}' has no config.json; point to a Hugging Face model directory")
    files = _tensor_files(path)
    hf = json.loads((path / "config.json").read_text())
    model_cfg = model_config_from_hf(hf, tie_default="lm_head.weight" not in files, dtype=dtype)
    if model_cfg.tie_embeddings and "lm_head.weight" in files and not _same_tensor(files, "lm_head.weight", EMBED):
        warnings.warn(  # transformers >= 5 does the same: it unties them rather than drop the tensor
            f"'{path}': tensor lm_head.weight differs from {EMBED} although tie_word_embeddings is true; "
            "loading it as a separate output layer, as transformers does",
            stacklevel=stacklevel,
        )
        model_cfg = dataclasses.replace(model_cfg, tie_embeddings=False)
    unused = sorted(set(files) - set(hf_tensor_names(model_cfg)) - _ignored_buffers(files))
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        warnings.warn(f"'{path}': tensors the model does not use: {', '.join(unused[:3])}{more}", stacklevel=stacklevel)
    return model_cfg, files


def from_hf(path: str | pathlib.Path, *, mesh: Mesh | None = None, dtype: str = "float32") -> tuple[Transformer, Config]:
    """Load a Hugging Face Llama/Mistral/Qwen2 directory. Returns ``(model, config)``.

    ``dtype`` is both the parameter and the compute dtype (``float32`` or ``bfloat16``). The
    config's ``data.tokenizer_path`` points at the directory's ``tokenizer.json`` when it has one.
    """
    path = pathlib.Path(path)
    model_cfg, files = hf_model_config(path, dtype=dtype, stacklevel=3)
    tokenizer = path / "tokenizer.json"
    cfg = validate(Config(
        model=model_cfg, mesh=_mesh_config(mesh),
        data=DataConfig(tokenizer_path=str(tokenizer.absolute()) if tokenizer.is_file() else ""),
    ))
    with contextlib.ExitStack() as stack:
        handles: dict[pathlib.Path, Any] = {}

        def read(name: str, slices: tuple[slice, ...]) -> np.ndarray:
            if name not in files:
                raise InteropError(f"tensor '{name}' is missing from the checkpoint in '{path}'")
            file = files[name]
            if file not in handles:
                handles[file] = stack.enter_context(_safe_open(file))
            return handles[file].get_slice(name)[slices]

        model = build_state(model_cfg, read, mesh)
    return model, cfg


def same_mode_as(path: pathlib.Path, like: pathlib.Path) -> None:
    """Give ``path`` the permissions of ``like``: safetensors writes its files 0600, while the files
    written beside them follow the umask (0644 usually), and shared model directories need them readable."""
    os.chmod(path, like.stat().st_mode & 0o777)


def to_hf(model: Transformer, cfg: Config, out_dir: str | pathlib.Path, *, dtype: str | None = None) -> pathlib.Path:
    """Write ``config.json`` + ``model.safetensors`` (and the tokenizer, when ``cfg`` names one).

    ``dtype`` (``float32``/``bfloat16``) defaults to the model's parameter dtype.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype or cfg.model.param_dtype)
    tensors = dict(to_hf_tensors(model, cfg.model, np_dtype))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = hf_config_from_model(cfg.model)
    hf["torch_dtype"] = np_dtype.name
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    same_mode_as(out / "model.safetensors", out / "config.json")
    if cfg.data.tokenizer_path:
        src = pathlib.Path(cfg.data.tokenizer_path).parent
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and (src / name).resolve() != (out / name).resolve():
                shutil.copyfile(src / name, out / name)
    return out
