"""``jaxlm convert SRC DST``: between Hugging Face / GGUF files and jaxlm checkpoint directories.

* SRC a Hugging Face directory (``config.json`` + safetensors) or a ``.gguf`` file -> DST a jaxlm
  checkpoint directory (params-only, step 0) that ``jaxlm generate --checkpoint DST`` reads. The
  tokenizer (and chat template) goes into ``DST/tokenizer/``.
* SRC a jaxlm checkpoint directory -> DST a Hugging Face directory (``to_hf``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

from flax import nnx

from jaxlm.checkpoint import Checkpointer, restore
from jaxlm.config import CheckpointConfig, Config, ConfigError
from jaxlm.interop.gguf import from_gguf, write_tokenizer_files
from jaxlm.interop.hf import TOKENIZER_FILES, from_hf, to_hf
from jaxlm.model import Transformer


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


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, *, dtype: str = "float32") -> str:
    """Convert ``src`` into ``dst`` (direction from what ``src`` is). Returns a one-line summary."""
    src, dst = pathlib.Path(src), pathlib.Path(dst).absolute()
    if _is_checkpoint(src):
        model, cfg = restore(src)
        to_hf(model, cfg, dst, dtype=dtype)
        return f"Hugging Face model written to {dst}"
    if dst.exists() and any(dst.iterdir()):
        raise ConfigError(f"'{dst}' is not empty; choose a new directory for the jaxlm checkpoint")
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
    else:
        raise ConfigError(f"'{src}' is neither a .gguf file, a Hugging Face directory (config.json) nor a jaxlm checkpoint")
    data = dataclasses.replace(cfg.data, tokenizer_path=str(tokenizer) if tokenizer else "")
    save_imported(model, cfg.replace(data=data), dst)
    return f"jaxlm checkpoint written to {dst}"
