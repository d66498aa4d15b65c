"""Starting a run from a pretrained model: ``model.init_from=PATH``.

PATH is a Hugging Face directory (``config.json`` + safetensors), a ``.gguf`` file, or a jaxlm
run / converted checkpoint directory. The architecture comes from the source
(:func:`resolve_init_from`); a ``model.*`` architecture key set in the config to another value is a
ConfigError naming both values. The weights are read onto the training mesh with their final
shardings, each device reading only its own shard (:func:`load_pretrained`, through
:func:`jaxlm.interop.from_hf`, :func:`jaxlm.interop.gguf.from_gguf` or :func:`jaxlm.checkpoint.restore`),
and the tokenizer, chat template and EOS set are copied into ``<checkpoint.dir>/tokenizer/``
(:func:`copy_tokenizer`), where ``jaxlm generate --chat`` and ``jaxlm serve`` find them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterable

from flax import nnx
from jax.sharding import Mesh

from jaxlm.config import Config, ConfigError, ModelConfig

# the model.* keys a pretrained source decides; the others (dtypes, remat, kernels, ...) stay the run's choice
ARCHITECTURE = (
    "vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "rope_theta",
    "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
    "qkv_bias", "norm_eps", "tie_embeddings",
)
TOKENIZER_DIR = "tokenizer"


def source_kind(path: str | pathlib.Path) -> str:
    """``hf``, ``gguf`` or ``jaxlm`` for what ``path`` holds; ConfigError for anything else."""
    p = pathlib.Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "config.json").is_file():
        return "hf"
    if p.is_dir() and any(c.is_dir() and c.name.isdigit() for c in p.iterdir()):
        return "jaxlm"
    what = "does not exist" if not p.exists() else "is neither a .gguf file, a Hugging Face directory (config.json) nor a jaxlm run"
    raise ConfigError(f"model.init_from '{p}' {what}; point it to a pretrained model")


def source_model_config(path: str | pathlib.Path) -> tuple[ModelConfig, str]:
    """(architecture of the source, its kind), reading metadata only."""
    kind = source_kind(path)
    if kind == "hf":
        from jaxlm.interop.hf import hf_model_config

        return hf_model_config(path, stacklevel=4)[0], kind
    if kind == "gguf":
        from jaxlm.interop.gguf import _reader, model_config_from_gguf

        return model_config_from_gguf(_reader(path)), kind
    from jaxlm.checkpoint import Checkpointer

    ckpt = Checkpointer(path, create=False)
    try:
        return ckpt.read_config().model, kind
    finally:
        ckpt.close()


def resolve_init_from(cfg: Config) -> Config:
    """``cfg`` with the architecture of ``cfg.model.init_from`` (unchanged when it is empty), whose
    path is made absolute: the run records it (a LoRA run re-reads its base from it), so the run
    works from any working directory.

    A ``model.*`` architecture key whose value is neither the default nor the source's is refused
    (ConfigError naming both values): the source decides the architecture.
    """
    if not cfg.model.init_from:
        return cfg
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, init_from=os.path.abspath(cfg.model.init_from)))
    source, _ = source_model_config(cfg.model.init_from)
    default = ModelConfig()
    arch = {}
    for name in ARCHITECTURE:
        given, theirs = getattr(cfg.model, name), getattr(source, name)
        if given != theirs and given != getattr(default, name):
            raise _contradiction(cfg, name, theirs)
        arch[name] = theirs
    return cfg.replace(model=dataclasses.replace(cfg.model, **arch))


def check_given_architecture(cfg: Config, given: Iterable[str]) -> None:
    """Refuse an architecture key named in ``given`` (the ``model`` keys a config file or override
    set) that contradicts ``cfg.model.init_from``, also when its value is the default (which
    :func:`resolve_init_from`, seeing only values, must let through)."""
    keys = [name for name in ARCHITECTURE if name in set(given)]
    if not cfg.model.init_from or not keys:
        return
    source, _ = source_model_config(cfg.model.init_from)
    for name in keys:
        if getattr(cfg.model, name) != getattr(source, name):
            raise _contradiction(cfg, name, getattr(source, name))


def _contradiction(cfg: Config, name: str, theirs: Any) -> ConfigError:
    return ConfigError(
        f"model.{name}={getattr(cfg.model, name)} contradicts model.init_from '{cfg.model.init_from}', which has "
        f"{name}={theirs}; drop model.{name} (the architecture comes from the pretrained model)"
    )


def load_pretrained(cfg: Config, mesh: Mesh | None) -> nnx.State:
    """The parameters of ``cfg.model.init_from`` in ``cfg.model.param_dtype``, each shard read onto its
    device of ``mesh`` (nothing gathers the whole model on one device). ``cfg`` must be resolved."""
    path = cfg.model.init_from
    kind, dtype = source_kind(path), cfg.model.param_dtype
    if kind == "hf":
        from jaxlm.interop.hf import from_hf

        model, src = from_hf(path, mesh=mesh, dtype=dtype)
    elif kind == "gguf":
        from jaxlm.interop.gguf import from_gguf

        model, src = from_gguf(path, mesh=mesh, dtype=dtype)
    else:
        from jaxlm.checkpoint import restore

        model, src = restore(path, mesh=mesh)  # a LoRA run comes back merged
    for name in ARCHITECTURE:  # resolve_init_from read the same source: a changed file is caught here
        if getattr(src.model, name) != getattr(cfg.model, name):
            raise ConfigError(f"model.init_from '{path}' changed while loading ({name}: {getattr(cfg.model, name)} "
                              f"then {getattr(src.model, name)}); run again")
    state = nnx.state(model)
    if kind == "jaxlm" and src.model.param_dtype != dtype:
        from jaxlm.lora import cast_base

        state = cast_base(state, dtype)
    return state


def _source_tokenizer(path: pathlib.Path, kind: str) -> pathlib.Path | None:
    """The folder holding the source's tokenizer files (None: the embedded tokenizer; a GGUF has none)."""
    if kind == "hf":
        return path
    if kind == "jaxlm":
        from jaxlm.checkpoint import Checkpointer

        ckpt = Checkpointer(path, create=False)
        try:
            tok = ckpt.read_config().data.tokenizer_path
        finally:
            ckpt.close()
        return pathlib.Path(tok).parent if tok else None
    return None


def copy_tokenizer(source: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path | None:
    """Copy the source's ``tokenizer.json``, ``tokenizer_config.json`` (chat template, special tokens),
    ``generation_config.json`` (the EOS set) and ``chat_template.jinja`` into ``out_dir``, as
    ``jaxlm convert`` stores them; a GGUF's are written from its metadata. Returns the copied
    ``tokenizer.json``, or None when the source uses the embedded tokenizer (a jaxlm run without one)."""
    from jaxlm.interop.hf import TOKENIZER_FILES

    src, out = pathlib.Path(source), pathlib.Path(out_dir)
    kind = source_kind(src)
    if kind == "gguf":
        from jaxlm.interop.gguf import write_tokenizer_files

        return write_tokenizer_files(src, out)
    folder = _source_tokenizer(src, kind)
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file() and (folder / name).resolve() != (out / name).resolve():
            shutil.copyfile(folder / name, out / name)
    if kind == "hf" and not (folder / "generation_config.json").is_file():
        from jaxlm.interop.convert import write_generation_config

        write_generation_config(json.loads((folder / "config.json").read_text()), out)
    return out / "tokenizer.json"


def place_tokenizer(cfg: Config, run_dir: str | pathlib.Path | None) -> Config:
    """``cfg`` with ``data.tokenizer_path`` at the source's tokenizer, copied into ``run_dir/tokenizer``
    (once: a resumed run keeps its copy). Without a run directory a Hugging Face or jaxlm source's own
    file is used, and a GGUF's is written to a temporary folder. A ``data.tokenizer_path`` set in the
    config must hold the same tokenizer (ConfigError otherwise)."""
    from jaxlm.data import tokenizer_hash

    if not cfg.model.init_from:
        return cfg
    src = pathlib.Path(cfg.model.init_from)
    if run_dir:
        out = pathlib.Path(run_dir).absolute() / TOKENIZER_DIR
        tok = out / "tokenizer.json" if (out / "tokenizer.json").is_file() else copy_tokenizer(src, out)
    elif source_kind(src) == "gguf":
        tok = copy_tokenizer(src, tempfile.mkdtemp(prefix="jaxlm-tokenizer-"))
    else:
        folder = _source_tokenizer(src, source_kind(src))
        tok = folder / "tokenizer.json" if folder is not None and (folder / "tokenizer.json").is_file() else None
    tok_path = "" if tok is None else str(pathlib.Path(tok).absolute())
    given = cfg.data.tokenizer_path
    if given and tokenizer_hash(given) != tokenizer_hash(tok_path):
        raise ConfigError(
            f"data.tokenizer_path='{given}' is not the tokenizer of model.init_from '{src}' ({tok_path or 'the embedded one'}); "
            "drop data.tokenizer_path (the pretrained model's own tokenizer is used)"
        )
    return cfg.replace(data=dataclasses.replace(cfg.data, tokenizer_path=tok_path))


def base_reference(cfg: Config, model_given: bool) -> str:
    """How a LoRA run names its frozen base (stored in its checkpoints)."""
    if model_given:
        from jaxlm.lora import MODEL_PASSED

        return MODEL_PASSED
    return cfg.model.init_from or f"random init (train.seed={cfg.train.seed})"


def load_base(cfg: Config, mesh: Mesh, model: Any = None) -> nnx.State:
    """The frozen base of a LoRA run: ``model``'s weights, else ``model.init_from``'s, else a random init
    from ``train.seed``; in ``train.lora.base_dtype``."""
    from jaxlm.build import build_model
    from jaxlm.lora import LoRAParam, base_dtype, cast_base

    if model is not None:
        state = nnx.state(model, nnx.Not(LoRAParam))
    elif cfg.model.init_from:
        state = load_pretrained(cfg, mesh)
    else:
        state = nnx.state(build_model(cfg.model, mesh, seed=cfg.train.seed))
    return cast_base(state, base_dtype(cfg.model, cfg.train.lora))
