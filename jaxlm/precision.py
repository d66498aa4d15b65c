"""Precision policies and dynamic loss scaling.

The policy is chosen by one key, ``model.compute_dtype``; master weights, optimizer moments,
norms, softmax, the loss and the gradient norm are float32 under every policy:

* ``float32``  - everything float32;
* ``bfloat16`` - matmul inputs bfloat16 (same exponent range as float32, no loss scaling);
* ``float16``  - matmul inputs float16 with dynamic loss scaling: the loss is multiplied by
  ``scale`` before differentiation so small gradients survive float16's narrow range, the
  gradients are divided by it again in float32, a step whose gradients overflow is skipped and
  halves the scale, and ``train.loss_scale_period`` good steps in a row double it.

The loss-scale state lives in the train state (and so in checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlm.config import Config


@dataclasses.dataclass(frozen=True)
class Policy:
    """How one run handles precision."""

    compute_dtype: str  # float32 | bfloat16 | float16
    loss_scaling: bool  # dynamic loss scaling (float16 only)
    init_scale: float  # the first loss scale (1.0 without loss scaling)
    period: int  # good steps before the scale doubles


def policy_for(cfg: Config) -> Policy:
    """The precision policy of a run, from ``model.compute_dtype`` and the ``train.loss_scale_*`` keys."""
    fp16 = cfg.model.compute_dtype == "float16"
    return Policy(
        compute_dtype=cfg.model.compute_dtype,
        loss_scaling=fp16,
        init_scale=cfg.train.loss_scale_init if fp16 else 1.0,
        period=cfg.train.loss_scale_period,
    )


class LossScale(NamedTuple):
    scale: jax.Array  # float32 [], a power of two; 1.0 when the policy has no loss scaling
    good_steps: jax.Array  # int32 [], finite steps since the scale last changed


def init_loss_scale(policy: Policy) -> LossScale:
    return LossScale(jnp.float32(policy.init_scale), jnp.int32(0))


def update_loss_scale(ls: LossScale, finite: jax.Array, policy: Policy) -> LossScale:
    """Halve the scale on a non-finite step (never below 1), double it after ``period`` finite ones.

    Without loss scaling the state is returned unchanged.
    """
    if not policy.loss_scaling:
        return ls
    good = jnp.where(finite, ls.good_steps + 1, 0)
    grow = good >= policy.period
    scale = jnp.where(finite, jnp.where(grow, ls.scale * 2.0, ls.scale), jnp.maximum(ls.scale * 0.5, 1.0))
    return LossScale(scale.astype(jnp.float32), jnp.where(grow, 0, good).astype(jnp.int32))


def all_finite(tree: Any) -> jax.Array:
    """bool []: every element of every leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


__all__ = ["LossScale", "Policy", "all_finite", "init_loss_scale", "policy_for", "update_loss_scale"]
