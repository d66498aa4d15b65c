"""Training: the train state, the jitted step, evaluation, and the loop with checkpoints.

``train_step(state, batch) -> (state, metrics)`` is a pure function compiled once with the
state's shardings and the state donated. The loop feeds it deterministic batches, shows a
progress bar, evaluates held-out loss, and saves asynchronous checkpoints that a later run
resumes from bit for bit.

Faults: a step whose loss or gradients are not finite, or whose update would make a parameter or
an optimizer moment non-finite, is skipped inside the compiled step (parameters and optimizer
state stay as they were; see :class:`TrainState` for the counters) and
logged; ``train.max_consecutive_skips`` such steps in a row stop the run with
:class:`TrainingDiverged`. SIGTERM or SIGINT saves a checkpoint at the current step and returns
(with several processes, after a step they all agree on); an unreadable latest checkpoint is set
aside with a warning and the previous one is used.

The loop (:class:`TrainLoop`) only runs steps and reads their metrics; evaluation, checkpoints,
the metrics log, printed lines, the progress bar, the preemption check and the profiler are hooks
(:mod:`jaxlm.hooks`), and users add their own with ``train(..., hooks=[...])``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxlm.build import abstract_model, build_model, like_param_shardings, replicated, state_shardings
from jaxlm.checkpoint import Checkpointer, tree_checksum
from jaxlm.config import Config, ConfigError, check_lora
from jaxlm.hooks import Hook, default_hooks
from jaxlm.loop import TrainingDiverged, TrainLoop
from jaxlm import pretrained
from jaxlm.lora import LoRAParam, abstract_lora_model, base_dtype, cast_base, check_base, init_adapters
from jaxlm.data import PackedLoader, load_splits, load_tokenizer, to_global_batch, tokenizer_hash
from jaxlm.metrics import memory_capacity, training_bytes
from jaxlm.model import Transformer
from jaxlm.optim import accumulate_gradients, learning_rate_schedule, make_optimizer
from jaxlm.precision import LossScale, Policy, all_finite, init_loss_scale, policy_for, update_loss_scale
from jaxlm.resume import resume
from sharding.mesh import make_mesh
from sharding.pipeline import bubble_fraction, num_stages
from sharding.rules import constrain, logical_sharding, mesh_axis_size, LOGICAL_RULES


class TrainState(NamedTuple):
    """What one step reads and writes.

    ``step`` counts the batches consumed, skipped steps included, so the loop, the data position
    and checkpoint numbers move together. A skipped step changes neither ``params`` nor
    ``opt_state``: the optimizer's own counter (its learning-rate schedule position and bias
    correction) counts applied updates only.
    """

    step: jax.Array  # int32 [], batches consumed (skipped steps included)
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState
    loss_scale: LossScale  # dynamic loss scale (float16 compute; constant 1 otherwise)


def cross_entropy_sum(
    logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(summed next-token cross-entropy, tokens counted), float32; ``mask_BxT`` (0/1) selects tokens."""
    logits = logits_BxTxV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    if mask_BxT is None:
        return jnp.sum(lse - target_logit), jnp.float32(targets_BxT.size)
    mask = mask_BxT.astype(jnp.float32)
    return jnp.sum((lse - target_logit) * mask), jnp.sum(mask)


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in float32; with ``mask_BxT`` (float 0/1) the mean over tokens where it is 1."""
    total, count = cross_entropy_sum(logits_BxTxV, targets_BxT, mask_BxT)
    return total / jnp.maximum(count, 1.0)


def _loss_sum_fn(graphdef: nnx.GraphDef):
    def loss_sum(
        params: nnx.State, batch: dict[str, jax.Array], base: nnx.State | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        # a LoRA run trains the adapters (params) over a frozen base
        model = nnx.merge(graphdef, params) if base is None else nnx.merge(graphdef, params, base)
        logits, _ = model(batch["inputs"], batch["positions"], segment_ids_BxT=batch.get("segment_ids"),
                          lora_dropout_key=dropout_key)
        return cross_entropy_sum(logits, batch["targets"], batch.get("loss_mask"))

    return loss_sum


def make_loss_fn(graphdef: nnx.GraphDef) -> Callable[[nnx.State, dict[str, jax.Array]], jax.Array]:
    """``(params, batch) -> mean loss`` over the batch's counted tokens."""
    loss_sum = _loss_sum_fn(graphdef)

    def loss_fn(params: nnx.State, batch: dict[str, jax.Array], base: nnx.State | None = None) -> jax.Array:
        total, count = loss_sum(params, batch, base)
        return total / jnp.maximum(count, 1.0)

    return loss_fn


def _counted_tokens(batch: dict[str, jax.Array]) -> jax.Array:
    mask = batch.get("loss_mask")
    count = jnp.float32(batch["targets"].size) if mask is None else jnp.sum(mask.astype(jnp.float32))
    return jnp.maximum(count, 1.0)


def _constrain_batch(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: constrain(v, ("batch", "seq")) for k, v in batch.items()}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    policy: Policy,
    grad_accum_steps: int = 1,
    dropout_seed: int | None = None,
):
    """The pure step: (loss-scaled) gradients accumulated over microbatches, then a guarded update.

    Metrics: ``loss`` (unscaled, float32), ``grad_norm`` (float32), ``lr`` (the schedule at
    ``state.step``; after skipped steps the optimizer's own count, which sets the rate applied,
    lags by the number skipped), ``skipped`` (int32 1 when the update was dropped for a non-finite
    loss or gradient, or because it would have made a parameter or optimizer moment non-finite)
    and ``loss_scale`` (the scale this step used).

    A LoRA step takes the frozen ``base`` as a third argument (``state.params`` holds the adapters);
    with ``dropout_seed`` the adapters' dropout masks come from ``fold_in(key(dropout_seed), step)``.
    """
    loss_sum = _loss_sum_fn(graphdef)

    def train_step(
        state: TrainState, batch: dict[str, jax.Array], base: nnx.State | None = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        scale = state.loss_scale.scale
        key = None if dropout_seed is None else jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        # Each microbatch's summed loss over the whole batch's token count, times the number of
        # microbatches (which the accumulation's mean divides out): the loss and gradient equal
        # the full batch's mean over counted tokens exactly, whatever the loss masks hold.
        norm = grad_accum_steps / _counted_tokens(batch)

        def loss_fn(params, mb):
            return loss_sum(params, mb, base, key)[0] * norm

        def scaled_loss(params, mb):
            loss = loss_fn(params, mb)
            return loss * scale, loss

        def loss_and_grad(params, mb):
            if not policy.loss_scaling:
                return jax.value_and_grad(loss_fn)(params, mb)
            (_, loss), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params, mb)
            return loss, grads

        loss, grads = accumulate_gradients(loss_and_grad, state.params, batch, grad_accum_steps, _constrain_batch)
        if policy.loss_scaling:
            grads = jax.tree.map(lambda g: g / scale, grads)
        finite = jnp.isfinite(loss) & all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Finite gradients can still give a non-finite update (a huge learning rate, a moment that
        # overflows): the new parameters and optimizer moments must be finite too, or nothing changes.
        finite = finite & all_finite(params) & all_finite(opt_state)
        keep_new = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep_new, params, state.params)
        opt_state = jax.tree.map(keep_new, opt_state, state.opt_state)
        loss_scale = update_loss_scale(state.loss_scale, finite, policy)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "skipped": (~finite).astype(jnp.int32),
            "loss_scale": scale,
        }
        return TrainState(state.step + 1, params, opt_state, loss_scale), metrics

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
        accum = cfg.train.grad_accum_steps
        if (cfg.train.batch_size // accum) % batch_axes:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} / train.grad_accum_steps={accum} is not divisible by "
                f"the data-parallel size {batch_axes}; each microbatch must split evenly over the devices"
            )
        micro = cfg.train.batch_size // accum
        if num_stages(mesh) > 1 and micro % (batch_axes * cfg.model.pipeline_microbatches):
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} / train.grad_accum_steps={accum} must be a multiple of "
                f"model.pipeline_microbatches={cfg.model.pipeline_microbatches} times the data-parallel size {batch_axes}"
            )
        self.policy = policy_for(cfg)
        self.lora = cfg.train.lora.rank > 0
        self.base: nnx.State | None = None  # a LoRA run's frozen base (set_base); params are its adapters
        self.base_meta: dict | None = None
        self.abstract_base: nnx.State | None = None  # LoRA: the frozen base's shapes, in train.lora.base_dtype
        if self.lora:
            self.graphdef, abstract, abstract_base = abstract_lora_model(cfg.model, cfg.train.lora)
            self.base_shardings = state_shardings(abstract_base, mesh)
            dtype = base_dtype(cfg.model, cfg.train.lora)
            self.abstract_base = jax.eval_shape(lambda b: cast_base(b, dtype), abstract_base)
        else:
            self.graphdef, abstract = abstract_model(cfg.model)
        self.tx = make_optimizer(cfg.train)
        self.schedule = learning_rate_schedule(cfg.train)
        self.param_shardings = state_shardings(abstract, mesh)
        self.abstract_params = abstract
        self.abstract_opt_state = jax.eval_shape(self.tx.init, abstract)
        self.opt_shardings = like_param_shardings(self.abstract_opt_state, abstract, self.param_shardings, mesh)
        rep = replicated(mesh)
        self.shardings = TrainState(rep, self.param_shardings, self.opt_shardings, LossScale(rep, rep))
        batch_sharding = logical_sharding(mesh, ("batch", "seq"))
        base = (self.base_shardings,) if self.lora else ()
        dropout_seed = cfg.train.seed if self.lora and cfg.train.lora.dropout > 0 else None
        self._step = jax.jit(
            make_train_step(self.graphdef, self.tx, self.schedule, self.policy, accum, dropout_seed),
            in_shardings=(self.shardings, batch_sharding, *base),
            out_shardings=(self.shardings, replicated(mesh)),
            donate_argnums=0,
        )
        self._loss = jax.jit(make_loss_fn(self.graphdef), in_shardings=(self.param_shardings, batch_sharding, *base))
        self._init_opt = jax.jit(self.tx.init, out_shardings=self.opt_shardings)
        self._all_finite = jax.jit(lambda params, opt_state: all_finite(params) & all_finite(opt_state))

    def init_state(self, params: nnx.State) -> TrainState:
        params = jax.device_put(params, self.param_shardings)
        with jax.set_mesh(self.mesh):
            opt_state = self._init_opt(params)
        return TrainState(jax.device_put(jnp.int32(0), replicated(self.mesh)), params, opt_state, self._loss_scale())

    def set_base(self, base: nnx.State, reference: str) -> None:
        """The frozen base of a LoRA run, placed on the mesh; its reference and checksum go into every save."""
        self.base = jax.device_put(base, self.base_shardings)
        self.base_meta = {"reference": reference, "checksum": tree_checksum(self.base)}

    def _base_args(self) -> tuple:
        if self.lora and self.base is None:
            raise ValueError("a LoRA trainer needs its frozen base: call set_base first")
        return (self.base,) if self.lora else ()

    def _loss_scale(self, saved: dict | None = None) -> LossScale:
        ls = init_loss_scale(self.policy)
        if saved is not None and self.policy.loss_scaling:
            ls = LossScale(jnp.float32(saved["scale"]), jnp.int32(saved["good_steps"]))
        return jax.device_put(ls, replicated(self.mesh))

    def step(self, state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(self.mesh):
            return self._step(state, batch, *self._base_args())

    def lower_step(self, state: TrainState, batch: dict[str, jax.Array], base: Any = None) -> jax.stages.Lowered:
        """The lowered train step, for inspecting compile time and memory. ``base``: a LoRA run's frozen
        base (arrays or ``ShapeDtypeStruct``), else the one given to :meth:`set_base`."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(state, batch, *((base,) if self.lora and base is not None else self._base_args()))

    def loss(self, params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
        with jax.set_mesh(self.mesh):
            return self._loss(params, batch, *self._base_args())

    def restore(self, ckpt: Checkpointer, step: int | None = None) -> tuple[TrainState, int]:
        params, opt_state, meta = ckpt.restore(
            self.abstract_params, self.param_shardings, self.abstract_opt_state, self.opt_shardings, step=step
        )
        if self.lora:
            check_base(ckpt.directory, meta, self.base_meta)
        step_array = jax.device_put(jnp.int32(meta["step"]), replicated(self.mesh))
        state = TrainState(step_array, params, opt_state, self._loss_scale(meta.get("loss_scale")))
        return state, int(meta["data_position"])

    @functools.cached_property
    def tokenizer_sha256(self) -> str:
        """sha256 of the tokenizer the run's token ids come from (stored with each checkpoint)."""
        return tokenizer_hash(self.cfg.data.tokenizer_path)

    def save(self, ckpt: Checkpointer, step: int, state: TrainState, data_position: int) -> None:
        """Start an asynchronous save of ``state`` (which is at ``step``).

        Raises TrainingDiverged, writing nothing, when a parameter or optimizer moment is not
        finite: a checkpoint is never written from a non-finite state.
        """
        with jax.set_mesh(self.mesh):
            finite = bool(self._all_finite(state.params, state.opt_state))
        if not finite:
            raise TrainingDiverged(
                f"not saving step {step}: its parameters or optimizer state are not finite (the checkpoints in "
                f"'{ckpt.directory}' are kept); start from finite parameters, lower train.learning_rate or check the data"
            )
        scale, good = jax.device_get((state.loss_scale.scale, state.loss_scale.good_steps))
        extra = {"loss_scale": {"scale": float(scale), "good_steps": int(good)},
                 "tokenizer_sha256": self.tokenizer_sha256}
        if self.lora:
            extra["lora_base"] = self.base_meta
        ckpt.save(step, state.params, state.opt_state, data_position, self.cfg, extra_meta=extra)


@dataclasses.dataclass
class TrainResult:
    model: Transformer
    history: list[dict[str, float]]  # per step: step, loss, grad_norm, lr, step_time_s, tokens_per_s (+ mfu, memory_bytes)
    val_loss_before: float
    val_loss_after: float  # nan when the run was stopped by a signal (no final evaluation)
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal ended the run early
    skipped_steps: tuple[int, ...] = ()  # steps whose update was dropped (non-finite loss or grads)


def _evaluate(trainer: Trainer, params: nnx.State, batches: list[dict[str, jax.Array]]) -> float:
    return float(np.mean([float(trainer.loss(params, b)) for b in batches]))


def _check_fits(cfg: Config, mesh: Mesh) -> None:
    """ConfigError, before anything is allocated, when the model and batch (and a LoRA run's adapters)
    cannot fit the mesh's memory."""
    micro, lora = cfg.train.batch_size // cfg.train.grad_accum_steps, cfg.train.lora
    need = training_bytes(cfg.model, micro, cfg.data.seq_len, lora)
    have = memory_capacity(list(mesh.devices.flat))
    if need > have:
        m, n = cfg.model, f"{mesh.size} devices hold {have / 2**30:.3g} GiB"
        sizes = f"model.vocab_size={m.vocab_size}, model.embed_dim={m.embed_dim}, model.num_layers={m.num_layers}"
        what, fix = "parameters, gradients, optimizer moments, logits", "make the model or the batch smaller"
        if lora.rank:
            sizes += f", train.lora.rank={lora.rank} on {','.join(lora.targets)}"
            what = "frozen base; adapters, their gradients and optimizer moments; logits"
            fix = "lower train.lora.rank or target fewer projections, make the model or the batch smaller"
        raise ConfigError(f"{sizes} and train.batch_size={cfg.train.batch_size} need at least {need / 2**30:.3g} GiB "
                          f"({what}) but the {n}; {fix}, or raise train.grad_accum_steps")


def _loaders(cfg: Config, splits, say: Callable[[str], None]) -> tuple[PackedLoader, PackedLoader]:
    """The train and validation loaders; says how many chat conversations ``data.seq_len`` cuts."""
    t, d = cfg.train, cfg.data
    sampler = PackedLoader(splits.train, d.seq_len, t.batch_size, seed=d.seed, loss_on=d.loss_on)
    val_sampler = PackedLoader(splits.val, d.seq_len, t.batch_size, seed=0, shuffle=False, loss_on=d.loss_on,
                               what="the held-out conversations (the last data.val_fraction)")
    cut = sampler.num_truncated + val_sampler.num_truncated
    if cut:
        say(f"{cut} conversation(s) longer than data.seq_len+1={d.seq_len + 1} tokens keep their start, lose the rest")
    return sampler, val_sampler


def _initial_params(
    cfg: Config, mesh: Mesh, model: Transformer | None, trainer: Trainer, say: Callable[[str], None]
) -> nnx.State:
    """What a run that resumes nothing trains: adapters (LoRA; the model's own when it has them), the given
    model, the pretrained source's weights, or a fresh init."""
    if trainer.lora:
        own = nnx.state(model, LoRAParam) if model is not None else None
        if own is not None and jax.tree.leaves(own):
            return own
        return init_adapters(cfg.model, cfg.train.lora, mesh, cfg.train.seed)
    if model is not None:
        return nnx.state(model)
    if cfg.model.init_from:
        say(f"initialising from {cfg.model.init_from}")
        return pretrained.load_pretrained(cfg, mesh)
    return nnx.state(build_model(cfg.model, mesh, seed=cfg.train.seed))


def train(
    cfg: Config,
    model: Transformer | None = None,
    *,
    mesh: Mesh | None = None,
    log: Callable[[str], None] = print,
    force: bool = False,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Train ``model`` (a fresh one when None) for ``cfg.train.steps`` steps on ``mesh``.

    With ``cfg.checkpoint.dir`` set, saves every ``save_every`` steps and at the end, and resumes
    from the newest readable checkpoint found there (parameters, optimizer, loss scale and data
    position). ``force`` starts afresh in a directory holding a different model, after moving its
    checkpoints aside. SIGTERM/SIGINT save the current step and return early (``stopped_by``);
    with several processes all stop after the same step. Too many non-finite steps in a row
    raise :class:`TrainingDiverged`. ``hooks`` (:class:`jaxlm.hooks.Hook`) run after the
    built-in ones (:func:`jaxlm.hooks.default_hooks`).

    ``cfg.model.init_from`` starts from a pretrained model (:mod:`jaxlm.pretrained`: its architecture,
    weights read onto ``mesh``, tokenizer copied into the run); a run that has saved a checkpoint
    resumes from it and never reads the source's weights again. With ``cfg.train.lora.rank > 0``
    only low-rank adapters train (:mod:`jaxlm.lora`) over a frozen base: ``model``, else
    ``model.init_from``, else a random init; the returned model carries the adapters unmerged.
    """
    if model is not None and cfg.model.init_from:
        raise ConfigError("pass a model to jaxlm.train or set model.init_from, not both")
    cfg = pretrained.resolve_init_from(cfg)
    check_lora(cfg.train.lora, cfg.model)  # again: model.init_from may have brought other projection sizes
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    _check_fits(cfg, mesh)
    cfg = pretrained.place_tokenizer(cfg, cfg.checkpoint.dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    if tokenizer.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.get_vocab_size()} tokens"
        )
    splits = load_splits(cfg.data, tokenizer)
    trainer = Trainer(cfg, mesh)
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda _: None)
    if trainer.lora:
        trainer.set_base(pretrained.load_base(cfg, mesh, model), pretrained.base_reference(cfg, model is not None))
    if num_stages(mesh) > 1:
        P, M = num_stages(mesh), cfg.model.pipeline_microbatches
        say(f"pipeline: {P} stages x {M} microbatches, bubble {bubble_fraction(P, M):.0%} of stage time")

    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint) if cfg.checkpoint.dir else None
    resumed = resume(trainer, ckpt, cfg, force, say) if ckpt is not None else None
    if resumed is not None:
        state, position = resumed
        say(f"resumed from step {int(state.step)} in {ckpt.directory}")
    else:
        state, position = trainer.init_state(_initial_params(cfg, mesh, model, trainer, say)), 0

    t = cfg.train
    sampler, val_sampler = _loaders(cfg, splits, say)
    n_val = min(t.eval_batches, max(1, val_sampler.num_rows // t.batch_size))
    val_batches = [to_global_batch(val_sampler.batch(i), mesh) for i in range(n_val)]
    evaluate = lambda params: _evaluate(trainer, params, val_batches)  # noqa: E731
    val_before = evaluate(state.params)
    say(f"validation loss before: {val_before:.4f}  ({n_val} batches of {t.batch_size}x{cfg.data.seq_len})")

    loop = TrainLoop(
        trainer, state, position, lambda i: to_global_batch(sampler.batch(i), mesh),
        [*default_hooks(cfg, ckpt, evaluate, trainer.policy.loss_scaling, is_main), *hooks],
        t.steps, say, ckpt=ckpt, last_saved=int(state.step) if resumed is not None else None,
    )
    loop.run()
    stopped = loop.stop_reason
    val_after = float("nan") if stopped else evaluate(loop.state.params)
    if not stopped:
        say(f"validation loss after:  {val_after:.4f}")
    final = (loop.state.params, trainer.base) if trainer.lora else (loop.state.params,)
    return TrainResult(
        nnx.merge(trainer.graphdef, *final), loop.history, val_before, val_after,
        stopped_by=stopped, skipped_steps=tuple(loop.skipped),
    )
