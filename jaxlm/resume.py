"""Resuming a run: which checkpoint of a run directory a new run continues from, or why it may not.

A run directory is resumed only by the run that wrote it: the same model (:func:`model_diff`), the
same LoRA setup (:func:`jaxlm.lora.lora_changed`) and the same tokenizer (the sha256 of its file,
stored with each checkpoint). Anything else is refused before a restore is tried, unless
``--force``, which moves the old run into ``superseded-*`` and starts afresh; unreadable newer
checkpoints are set aside (``N.corrupt``) once an older one restores.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable

from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError, config_from_dict
from jaxlm.data import tokenizer_changed
from jaxlm.errors import CheckpointError, JaxlmError
from jaxlm.lora import lora_changed

if TYPE_CHECKING:
    from jaxlm.train import Trainer, TrainState


def model_diff(saved: Config, cfg: Config) -> list[str]:
    """The ``model.*`` fields whose values differ between a saved run's config and ``cfg``."""
    def key(m, name):  # init_from: runs that recorded a relative path compare by the path it means here
        value = getattr(m, name)
        return os.path.abspath(value) if name == "init_from" and value else value
    return [f.name for f in dataclasses.fields(cfg.model) if key(saved.model, f.name) != key(cfg.model, f.name)]


def _incompatible(saved: Config, meta: dict, cfg: Config, directory) -> tuple[str, str] | None:
    """(the refusal, the warning under --force) when ``cfg`` cannot continue the run a checkpoint
    (its config ``saved`` and metadata ``meta``) holds: another model, LoRA setup or tokenizer."""
    diff = model_diff(saved, cfg)
    if diff:
        return (f"checkpoint directory '{directory}' holds a run with a different model "
                f"(model.{', model.'.join(diff)} differ); use a new checkpoint.dir, or --force to set it aside",
                f"the run in '{directory}' had a different model")
    lora_diff = lora_changed(saved, cfg)
    if lora_diff:
        key, was, now = lora_diff
        return (f"checkpoint directory '{directory}' holds a run with train.lora.{key}={was}, not {now}; "
                "use a new checkpoint.dir, or --force to move that run aside and start afresh",
                f"the run in '{directory}' had train.lora.{key}={was}")
    changed = tokenizer_changed(meta.get("tokenizer_sha256"), saved.data.tokenizer_path, cfg.data.tokenizer_path)
    if changed:
        what, fix = changed
        return (f"checkpoint directory '{directory}' holds a run it cannot continue: {what}; "
                f"{fix}, use a new checkpoint.dir, or --force to set it aside",
                f"in '{directory}' {what}")
    return None


def resume(
    trainer: Trainer, ckpt: Checkpointer, cfg: Config, force: bool, say: Callable[[str], None]
) -> tuple[TrainState, int] | None:
    """The state of the newest readable checkpoint, or None when there is none (or ``force`` set them aside).

    Unreadable newer checkpoints are renamed ``N.corrupt``, each with a one-line warning, once an
    older one has restored. When none restores (more likely a changed setup than corruption)
    nothing is renamed and the run is refused unless ``force``. A directory holding a run that
    ``cfg`` cannot continue (another model, LoRA setup or tokenizer: :func:`_incompatible`) is
    refused (ConfigError) before any restore is tried, unless ``force``, which moves its
    checkpoints into a ``superseded-*`` folder and starts afresh.
    """
    bad: list[tuple[int, JaxlmError]] = []

    def start_afresh(why: str) -> None:
        where = ckpt.set_aside("superseded")
        say(f"warning: {why}; moved its checkpoints to '{where}', starting afresh")

    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            meta = ckpt.read_meta(step)
            saved = config_from_dict(meta["config"])
        except (CheckpointError, ConfigError) as e:  # unreadable, or a config this version refuses
            bad.append((step, e))
            continue
        why = _incompatible(saved, meta, cfg, ckpt.directory)
        if why and not force:
            raise ConfigError(why[0])
        if why:
            start_afresh(why[1])
            return None
        try:
            restored = trainer.restore(ckpt, step)
        except CheckpointError as e:
            bad.append((step, e))
            continue
        for bad_step, e in bad:
            say(f"warning: {e}; set aside as {ckpt.quarantine(bad_step).name}, resuming from an older step")
        return restored
    if bad and not force:
        raise CheckpointError(f"no checkpoint in '{ckpt.directory}' can be restored ({bad[0][1]}); use a new "
                          "checkpoint.dir, or --force to set them aside")
    if bad:
        start_afresh(f"no checkpoint in '{ckpt.directory}' can be restored")
    return None
