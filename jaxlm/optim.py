"""The optax chain built from ``TrainConfig``: clip by global norm -> AdamW on a warmup+cosine schedule.

Weight decay applies to matrices only (no decay on norm scales); the embedding table is a
matrix and is decayed, as in Llama training recipes. Optimizer moments are float32 and take the
sharding of their parameters (FSDP shards them too).
"""

from __future__ import annotations

import jax
import optax

from jaxlm.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``min_lr_ratio * learning_rate``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.steps,
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def decay_mask(params):
    """True for parameters that get weight decay: every weight except the RMSNorm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            learning_rate_schedule(cfg),
            b1=cfg.beta1,
            b2=cfg.beta2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
