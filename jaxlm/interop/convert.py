"""``jaxlm convert SRC DST``: between Hugging Face / GGUF files and jaxlm checkpoint directories.

* SRC a Hugging Face directory (``config.json`` + safetensors) or a ``.gguf`` file -> DST a jaxlm
  checkpoint directory (params-only, step 0) that ``jaxlm generate --checkpoint DST`` reads. The
  tokenizer, chat template and ``generation_config.json`` (the EOS set, :mod:`jaxlm.interop.eos`)
  go into ``DST/tokenizer/``.
* SRC a jaxlm checkpoint directory -> DST a Hugging Face directory (``to_hf``); a LoRA run's
  adapters are merged into the weights, or with ``adapter_only`` written alone as a PEFT adapter
  (:mod:`jaxlm.interop.peft`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

from flax import nnx

from jaxlm.checkpoint import Checkpointer, restore
from jaxlm.config import CheckpointConfig, Config, ConfigError
from jaxlm.interop.gguf import from_gguf, write_tokenizer_files
from jaxlm.interop.hf import TOKENIZER_FILES, from_hf, to_hf
from jaxlm.model import Transformer


def write_generation_config(hf_config: dict, out_dir: pathlib.Path) -> None:
    """``generation_config.json`` from a ``config.json``'s token ids, as transformers derives it
    (``GenerationConfig.from_model_config``) when a model ships none: the EOS set travels with the checkpoint."""
    keep = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_config.get(k) is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(keep, indent=2) + "\n")


def _is_checkpoint(path: pathlib.Path) -> bool:
    return path.is_dir() and any(p.is_dir() and p.name.isdigit() for p in path.iterdir())


def save_imported(model: Transformer, cfg: Config, dst: pathlib.Path) -> None:
    """A params-only checkpoint at step 0 in ``dst``."""
    ckpt = Checkpointer(dst, CheckpointConfig(async_save=False))
    try:
        ckpt.save(0, nnx.state(model), None, 0, cfg)
        ckpt.wait()
    finally:
        ckpt.close()


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, *, dtype: str = "float32", adapter_only: bool = False) -> str:
    """Convert ``src`` into ``dst`` (direction from what ``src`` is). Returns a one-line summary."""
    src, dst = pathlib.Path(src), pathlib.Path(dst).absolute()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):  # nothing already there is overwritten
        raise ConfigError(f"'{dst}' is not an empty directory; choose a new directory to write into")
    if adapter_only:
        if not _is_checkpoint(src):
            raise ConfigError(f"--adapter-only exports a LoRA run; '{src}' is not a jaxlm run directory")
        from jaxlm.interop.peft import to_peft
        from jaxlm.lora import restore_adapters

        adapters, cfg = restore_adapters(src)
        to_peft(adapters, cfg, dst)
        return f"PEFT adapter written to {dst}"
    if _is_checkpoint(src):
        model, cfg = restore(src)
        to_hf(model, cfg, dst, dtype=dtype)
        return f"Hugging Face model written to {dst}"
    tok_dir = dst / "tokenizer"
    if src.is_file() and src.suffix == ".gguf":
        model, cfg = from_gguf(src, dtype=dtype)
        tokenizer = write_tokenizer_files(src, tok_dir)
    elif (src / "config.json").is_file():
        model, cfg = from_hf(src, dtype=dtype)
        tokenizer = None
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                tok_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, tok_dir / name)
                tokenizer = tok_dir / "tokenizer.json" if name == "tokenizer.json" else tokenizer
        if tokenizer is not None and not (src / "generation_config.json").is_file():
            write_generation_config(json.loads((src / "config.json").read_text()), tok_dir)
    else:
        raise ConfigError(f"'{src}' is neither a .gguf file, a Hugging Face directory (config.json) nor a jaxlm checkpoint")
    data = dataclasses.replace(cfg.data, tokenizer_path=str(tokenizer) if tokenizer else "")
    save_imported(model, cfg.replace(data=data), dst)
    return f"jaxlm checkpoint written to {dst}"
