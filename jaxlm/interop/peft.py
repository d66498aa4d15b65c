"""A LoRA run's adapters as a PEFT adapter directory: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT (``peft.tuners.lora``) stores, per adapted ``nn.Linear`` with ``weight [out, in]``,
``lora_A.weight [r, in]`` and ``lora_B.weight [out, r]`` under the module's name in the wrapped
model, ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` (the adapter name is
dropped on save, ``peft.utils.save_and_load.get_peft_model_state_dict``), and applies
``lora_alpha / r * B(A(x))``. jaxlm's ``A [L, *in, r]`` and ``B [L, r, *out]`` flatten to those
(heads and head_dim folded as in :mod:`jaxlm.interop.layout`), so ``peft.PeftModel.from_pretrained``
on the Hugging Face base gives jaxlm's logits.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from jaxlm.config import Config, ConfigError
from jaxlm.interop.hf import same_mode_as
from jaxlm.lora import TARGET_WEIGHTS

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_tensors(adapters: Any, cfg: Config) -> dict[str, np.ndarray]:
    """PEFT name -> float32 array for every adapter of every layer. ``adapters`` is the ``nnx.State`` of
    the model's :class:`jaxlm.lora.LoRAParam` leaves (``nnx.state(model, LoRAParam)``)."""
    import jax

    out: dict[str, np.ndarray] = {}
    for target in cfg.train.lora.targets:
        sub, _, hf_module = TARGET_WEIGHTS[target]
        pair = adapters["blocks"][sub]["lora"][target]
        a = np.asarray(jax.device_get(pair["lora_a"].get_value()), np.float32)  # [L, *in, r]
        b = np.asarray(jax.device_get(pair["lora_b"].get_value()), np.float32)  # [L, r, *out]
        for i in range(cfg.model.num_layers):
            name = f"base_model.model.model.layers.{i}.{hf_module}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, a.shape[-1]).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(b.shape[1], -1).T)
    return out


def adapter_config(cfg: Config) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` fields for this run (the others take PEFT's defaults when loaded)."""
    lora = cfg.train.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.model.init_from or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [TARGET_WEIGHTS[t][2].split(".")[-1] for t in lora.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def to_peft(adapters: Any, cfg: Config, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` into ``out_dir`` (refused when not empty)."""
    if cfg.train.lora.rank == 0:
        raise ConfigError("--adapter-only exports the adapters of a LoRA run (train.lora.rank > 0); this run has none")
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"'{out}' is not empty; choose a new directory for the adapter")
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors(adapters, cfg), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg), indent=2) + "\n")
    same_mode_as(out / ADAPTER_WEIGHTS, out / ADAPTER_CONFIG)
    return out
