"""The optax chain built from ``TrainConfig``: clip by global norm -> AdamW on a warmup+cosine schedule.

Weight decay applies to the projection matrices of the blocks only: never to norm scales, nor to
the embeddings (the token table, and the output head when untied). Optimizer moments are float32
and take the sharding of their parameters (FSDP shards them too). Gradient accumulation over
microbatches runs inside the jitted step as a ``lax.scan`` (:func:`accumulate_gradients`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxlm.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``min_lr_ratio * learning_rate``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),  # warmup_steps == steps leaves no decay phase
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


_NO_DECAY_TOP = ("embed", "lm_head")  # embeddings: the token table and the untied output head


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: every weight except norm scales and embeddings."""

    def decays(path: tuple, _: Any) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return names[0] not in _NO_DECAY_TOP and not any("norm" in n for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def split_microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """``[B, ...]`` leaves -> ``[n, B // n, ...]``; microbatch ``i`` takes rows ``i, i + n, ...``.

    Taking strided rows keeps each microbatch spread over the same devices as the full batch
    (a contiguous split would put a whole microbatch on a few data-parallel shards).
    """

    def split(x: jax.Array) -> jax.Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_and_grad: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, Any]],
    params: Any,
    batch: dict[str, jax.Array],
    num_microbatches: int,
    constrain_micro: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] = lambda b: b,
) -> tuple[jax.Array, Any]:
    """(mean loss, mean grads) over ``num_microbatches`` equal slices of ``batch``, via ``lax.scan``.

    ``loss_and_grad(params, microbatch) -> (loss, grads)`` returns a per-token mean loss, so the
    mean over equal microbatches equals the full-batch loss and gradient. Sums are float32.
    With one microbatch this is just ``loss_and_grad(params, batch)``.
    """
    if num_microbatches == 1:
        return loss_and_grad(params, batch)
    micro = split_microbatches(batch, num_microbatches)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

    def body(carry, mb):
        loss_sum, grad_sum = carry
        loss, grads = loss_and_grad(params, constrain_micro(mb))
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return (loss_sum + loss.astype(jnp.float32), grad_sum), None

    (loss_sum, grad_sum), _ = jax.lax.scan(body, (jnp.float32(0.0), zeros), micro)
    scale = 1.0 / num_microbatches
    grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), grad_sum, params)
    return loss_sum * scale, grads


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then ``cfg.optimizer`` on the warmup + cosine schedule.

    ``adamw`` and ``lion`` use ``beta1``/``beta2`` and decoupled weight decay (not on norms and
    embeddings); ``adafactor`` keeps factored second moments (memory ~ rows + columns per matrix)
    with its own decay rate, and the same weight-decay mask.
    """
    lr = learning_rate_schedule(cfg)
    if cfg.optimizer == "lion":
        core = optax.lion(lr, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)
    elif cfg.optimizer == "adafactor":
        core = optax.adafactor(
            lr, multiply_by_parameter_scale=False, weight_decay_rate=cfg.weight_decay,
            weight_decay_mask=decay_mask,
        )
    else:
        core = optax.adamw(lr, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core)
