"""Training: the train state, the jitted step, evaluation, and the loop with checkpoints.

``train_step(state, batch) -> (state, metrics)`` is a pure function compiled once with the
state's shardings and the state donated. The loop feeds it deterministic batches, shows a
progress bar, evaluates held-out loss, and saves asynchronous checkpoints that a later run
resumes from bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlm.build import abstract_model, build_model, like_param_shardings, replicated, state_shardings
from jaxlm.checkpoint import Checkpointer
from jaxlm.config import Config, ConfigError
from jaxlm.data import PackedLoader, load_splits, load_tokenizer, to_global_batch
from jaxlm.model import Transformer
from jaxlm.optim import learning_rate_schedule, make_optimizer
from sharding.mesh import make_mesh
from sharding.pipeline import bubble_fraction, num_stages
from sharding.rules import logical_sharding, mesh_axis_size, LOGICAL_RULES


class TrainState(NamedTuple):
    step: jax.Array  # int32 [], number of updates applied
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in float32; with ``mask_BxT`` (float 0/1) the mean over tokens where it is 1."""
    logits = logits_BxTxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    if mask_BxT is None:
        return jnp.mean(lse - target_logit)
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum((lse - target_logit) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, dict[str, jax.Array]], jax.Array]:
    def loss_fn(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["inputs"], batch["positions"], segment_ids_BxT=batch.get("segment_ids"))
        return cross_entropy(logits, batch["targets"], batch.get("loss_mask"))

    return loss_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule):
    loss_fn = make_loss_fn(graphdef)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


class Trainer:
    """Compiled step, eval and state layout for one (config, mesh)."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        batch_axes = mesh_axis_size(mesh, LOGICAL_RULES["batch"])
        if cfg.train.batch_size % batch_axes:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the data-parallel size "
                f"{batch_axes} (mesh data*fsdp); pick a multiple of it"
            )
        if num_stages(mesh) > 1 and cfg.train.batch_size % (batch_axes * cfg.model.pipeline_microbatches):
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} must be a multiple of model.pipeline_microbatches="
                f"{cfg.model.pipeline_microbatches} times the data-parallel size {batch_axes}"
            )
        self.graphdef, abstract = abstract_model(cfg.model)
        self.tx = make_optimizer(cfg.train)
        self.schedule = learning_rate_schedule(cfg.train)
        self.param_shardings = state_shardings(abstract, mesh)
        self.abstract_params = abstract
        self.abstract_opt_state = jax.eval_shape(self.tx.init, abstract)
        self.opt_shardings = like_param_shardings(self.abstract_opt_state, abstract, self.param_shardings, mesh)
        self.shardings = TrainState(replicated(mesh), self.param_shardings, self.opt_shardings)
        batch_sharding = logical_sharding(mesh, ("batch", "seq"))
        self._step = jax.jit(
            make_train_step(self.graphdef, self.tx, self.schedule),
            in_shardings=(self.shardings, batch_sharding),
            out_shardings=(self.shardings, replicated(mesh)),
            donate_argnums=0,
        )
        self._loss = jax.jit(make_loss_fn(self.graphdef), in_shardings=(self.param_shardings, batch_sharding))
        self._init_opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)

    def init_state(self, params: nnx.State) -> TrainState:
        params = jax.device_put(params, self.param_shardings)
        with jax.set_mesh(self.mesh):
            opt_state = self._init_opt(params)
        return TrainState(jax.device_put(jnp.int32(0), replicated(self.mesh)), params, opt_state)

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def lower_step(self, state: TrainState, batch: dict[str, jax.Array]) -> jax.stages.Lowered:
        """The lowered train step, for inspecting compile time and memory."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(state, batch)

    def loss(self, params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return self._loss(params, batch)

    def restore(self, ckpt: Checkpointer, step: int | None = None) -> tuple[TrainState, int]:
        params, opt_state, meta = ckpt.restore(
            self.abstract_params, self.param_shardings, self.abstract_opt_state, self.opt_shardings, step=step
        )
        state = TrainState(jax.device_put(jnp.int32(meta["step"]), replicated(self.mesh)), params, opt_state)
        return state, int(meta["data_position"])


@dataclasses.dataclass
class TrainResult:
    model: Transformer
    history: list[dict[str, float]]  # one entry per step: step, loss, grad_norm, lr, tokens_per_s
    val_loss_before: float
    val_loss_after: float


def _evaluate(trainer: Trainer, params: nnx.State, batches: list[dict[str, jax.Array]]) -> float:
    return float(np.mean([float(trainer.loss(params, b)) for b in batches]))


def _check_resumable(ckpt: Checkpointer, cfg: Config) -> None:
    saved = ckpt.read_config()
    if saved.model != cfg.model:
        diff = [f.name for f in dataclasses.fields(cfg.model) if getattr(saved.model, f.name) != getattr(cfg.model, f.name)]
        raise ConfigError(
            f"checkpoint directory '{ckpt.directory}' holds a run with a different model "
            f"(model.{', model.'.join(diff)} differ); use a new checkpoint.dir"
        )


def train(
    cfg: Config,
    model: Transformer | None = None,
    *,
    mesh: Mesh | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` (a fresh one when None) for ``cfg.train.steps`` steps on ``mesh``.

    With ``cfg.checkpoint.dir`` set, saves every ``save_every`` steps and at the end, and resumes
    from the latest checkpoint found there (parameters, optimizer and data position).
    """
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.get_vocab_size()} tokens"
        )
    splits = load_splits(cfg.data, tokenizer)
    trainer = Trainer(cfg, mesh)
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda _: None)
    if num_stages(mesh) > 1:
        P, M = num_stages(mesh), cfg.model.pipeline_microbatches
        say(f"pipeline: {P} stages x {M} microbatches, bubble {bubble_fraction(P, M):.0%} of stage time")

    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint) if cfg.checkpoint.dir else None
    if ckpt is not None and ckpt.latest_step() is not None:
        _check_resumable(ckpt, cfg)
        state, position = trainer.restore(ckpt)
        say(f"resumed from step {int(state.step)} in {ckpt.directory}")
    else:
        if model is None:
            model = build_model(cfg.model, mesh, seed=cfg.train.seed)
        state, position = trainer.init_state(nnx.state(model)), 0

    t = cfg.train
    sampler = PackedLoader(splits.train, cfg.data.seq_len, t.batch_size, seed=cfg.data.seed)
    val_sampler = PackedLoader(splits.val, cfg.data.seq_len, t.batch_size, seed=0, shuffle=False)
    n_val = min(t.eval_batches, max(1, val_sampler.num_rows // t.batch_size))
    val_batches = [to_global_batch(val_sampler.batch(i), mesh) for i in range(n_val)]
    val_before = _evaluate(trainer, state.params, val_batches)
    say(f"validation loss before: {val_before:.4f}  ({n_val} batches of {t.batch_size}x{cfg.data.seq_len})")

    first = int(state.step)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    history: list[dict[str, float]] = []
    bar = None
    if is_main and t.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=first, desc="train", dynamic_ncols=True)
    pending: tuple[int, dict[str, jax.Array]] | None = None
    last_time = time.perf_counter()

    def record(step: int, metrics: dict[str, jax.Array]) -> None:
        nonlocal last_time
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        values.update(step=step, tokens_per_s=tokens_per_step / max(now - last_time, 1e-9))
        last_time = now
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss is {values['loss']} at step {step}")
        history.append(values)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}")

    for step in range(first + 1, t.steps + 1):
        batch = to_global_batch(sampler.batch(position), mesh)
        position += 1
        state, metrics = trainer.step(state, batch)
        if pending is not None:  # read the previous step's metrics while this one runs
            record(*pending)
        pending = (step, metrics)
        if ckpt is not None and (step % cfg.checkpoint.save_every == 0 or step == t.steps):
            ckpt.save(step, state.params, state.opt_state, position, cfg)
        if step % t.eval_every == 0 and step != t.steps:
            record(*pending)
            pending = None
            message = f"step {step}: validation loss {_evaluate(trainer, state.params, val_batches):.4f}"
            if bar is not None:
                bar.write(message)  # printed above the bar, not into it
            else:
                say(message)
    if pending is not None:
        record(*pending)
    if bar is not None:
        bar.close()
    val_after = _evaluate(trainer, state.params, val_batches)
    say(f"validation loss after:  {val_after:.4f}")
    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    return TrainResult(nnx.merge(trainer.graphdef, state.params), history, val_before, val_after)
