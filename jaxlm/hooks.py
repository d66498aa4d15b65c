"""Training-loop hooks: small objects the loop in :mod:`jaxlm.train` calls around each step.

The loop runs steps; everything else is a :class:`Hook`. After step ``s`` the loop calls
``after_step`` of each hook whose ``due(loop)`` holds (by default ``s % every == 0``), in list
order, and ``on_metrics`` of every hook for each line of metrics (a step's ``loss``, ``grad_norm``,
... read one step late so the host never waits for the device, or an evaluation's ``val_loss``).

The built-in hooks, in the order :func:`default_hooks` lists them:

=====================  ====================  ==================================================
hook                   every                 does
=====================  ====================  ==================================================
``PreemptionHook``     1                     stops every process after the same step on
                                             SIGTERM/SIGINT (agreed through jax's preemption
                                             sync point when there are several processes)
``ProfilerHook``       1                     ``jax.profiler`` trace of ``train.profile_steps``
``EvaluationHook``     ``train.eval_every``  held-out loss (not at the last step or when stopping)
``MetricsHook``        each metrics line     ``metrics.jsonl`` + TensorBoard beside checkpoints
``CheckpointHook``     ``save_every``        asynchronous save; also at the last step and when
                                             stopping
``LogHook``            ``train.log_every``   one printed line of the step's metrics
``ProgressBarHook``    each metrics line     the tqdm bar (process 0)
=====================  ====================  ==================================================

A user hook subclasses :class:`Hook` and is passed as ``jaxlm.train(cfg, hooks=[MyHook()])``; it
runs after the built-in ones. ``loop`` (a :class:`jaxlm.loop.TrainLoop`) exposes ``step``,
``state`` (the :class:`~jaxlm.train.TrainState` after the step), ``history``, ``cfg``,
``trainer``, ``flush()`` (record the pending step's metrics now), ``show(message)`` and
``request_stop(reason)``. A hook that stops a multi-process run must decide the same on every
process at the same step.
"""

from __future__ import annotations

import os
import pathlib
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
from jax.experimental import multihost_utils

from jaxlm.errors import DistributedError
from jaxlm.loop import TrainingDiverged
from jaxlm.metrics import MetricsLog

if TYPE_CHECKING:
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.loop import TrainLoop


class Hook:
    """Base: every method is a no-op; ``every`` is the step interval of ``after_step`` (0: never)."""

    every: int = 1

    def due(self, loop: TrainLoop) -> bool:
        """Whether ``after_step`` runs after ``loop.step``."""
        return self.every > 0 and loop.step % self.every == 0

    def start(self, loop: TrainLoop) -> None:
        """Before the first step (after a resume, ``loop.step`` is the restored step)."""

    def before_step(self, loop: TrainLoop) -> None:
        """Before step ``loop.step`` runs."""

    def after_step(self, loop: TrainLoop) -> None:
        """After step ``loop.step`` when ``due``; ``loop.state`` is the state after it."""

    def on_metrics(self, loop: TrainLoop, step: int, values: Mapping[str, float]) -> None:
        """One line of metrics of ``step`` (host floats)."""

    def before_save(self, loop: TrainLoop) -> None:
        """Just before a checkpoint of ``loop.step`` is started (every metrics line is recorded)."""

    def end(self, loop: TrainLoop) -> None:
        """Always, also after an error; release what ``start`` took."""


class PreemptionHook(Hook):
    """SIGTERM or SIGINT stops the run after a step every process agrees on.

    One process: a signal handler notes the signal, and the loop stops after the step running
    when it came. Several processes: jax's preemption service (on since
    :func:`sharding.distributed.initialize`) catches SIGTERM in any process, tells the others,
    and ``reached_preemption_sync_point(step)`` turns true on all of them at the same step;
    SIGINT is passed on as SIGTERM. A second SIGINT raises KeyboardInterrupt at once.
    """

    every = 1

    def __init__(self) -> None:
        self.signals: list[str] = []
        self._restore: Callable[[], None] = lambda: None
        self.agreed = False

    def start(self, loop: TrainLoop) -> None:
        self.agreed = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return
        signums = (signal.SIGINT,) if self.agreed else (signal.SIGTERM, signal.SIGINT)
        old = {s: signal.getsignal(s) for s in signums}

        def handler(signum, _frame):
            if self.signals and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signals.append(signal.Signals(signum).name)
            if self.agreed:
                os.kill(os.getpid(), signal.SIGTERM)  # to jax's preemption notifier

        for s in signums:
            signal.signal(s, handler)
        self._restore = lambda: [signal.signal(s, h) for s, h in old.items()]

    def after_step(self, loop: TrainLoop) -> None:
        if not self.agreed:
            if self.signals:
                loop.request_stop(self.signals[0])
            return
        try:
            reached = multihost_utils.reached_preemption_sync_point(loop.step)
        except RuntimeError as e:
            raise DistributedError(
                f"cannot agree on a stopping step ({e}); join the job with sharding.distributed.initialize(), "
                "or set jax_enable_preemption_service before jax.distributed.initialize"
            ) from None
        if reached:
            loop.request_stop(self.signals[0] if self.signals else "SIGTERM")

    def end(self, loop: TrainLoop) -> None:
        self._restore()


class ProfilerHook(Hook):
    """A ``jax.profiler`` trace of steps ``first..last`` (inclusive) written under ``directory``
    (TensorBoard's profile plugin or Perfetto reads it)."""

    every = 1

    def __init__(self, first: int, last: int, directory: str | pathlib.Path):
        self.first, self.last, self.directory = first, last, pathlib.Path(directory)
        self.tracing = False

    def before_step(self, loop: TrainLoop) -> None:
        if not self.tracing and self.first <= loop.step <= self.last:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after_step(self, loop: TrainLoop) -> None:
        if self.tracing and (loop.step >= self.last or loop.stopping):
            self._stop(loop)

    def _stop(self, loop: TrainLoop) -> None:
        jax.block_until_ready(loop.state)  # the traced steps' device work ends inside the trace
        jax.profiler.stop_trace()
        self.tracing = False
        loop.show(f"profile of steps {self.first}..{min(loop.step, self.last)} written to {self.directory}")

    def end(self, loop: TrainLoop) -> None:
        if self.tracing:
            self._stop(loop)


class EvaluationHook(Hook):
    """Held-out loss every ``every`` steps, except at the last step (the caller evaluates after
    the loop) and when stopping."""

    def __init__(self, every: int, evaluate: Callable[[Any], float]):
        self.every, self.evaluate = every, evaluate

    def due(self, loop: TrainLoop) -> bool:
        return super().due(loop) and loop.step != loop.last_step and not loop.stopping

    def after_step(self, loop: TrainLoop) -> None:
        loop.flush()
        val = self.evaluate(loop.state.params)
        loop.write_metrics(loop.step, {"val_loss": val})
        loop.show(f"step {loop.step}: validation loss {val:.4f}")


class MetricsHook(Hook):
    """Every metrics line into ``metrics.jsonl`` and TensorBoard under ``directory`` (nothing when
    None); on disk before each checkpoint starts; lines past a restored step are dropped."""

    every = 0

    def __init__(self, directory: str | pathlib.Path | None):
        self.directory = directory
        self.log: MetricsLog | None = None

    def start(self, loop: TrainLoop) -> None:
        self.log = MetricsLog(self.directory, start_step=loop.step)

    def on_metrics(self, loop: TrainLoop, step: int, values: Mapping[str, float]) -> None:
        self.log.write(step, values)

    def before_save(self, loop: TrainLoop) -> None:
        self.log.commit()  # every line up to this step is on disk before the checkpoint can commit

    def end(self, loop: TrainLoop) -> None:
        if self.log is not None:
            self.log.close()


class CheckpointHook(Hook):
    """An asynchronous checkpoint every ``every`` steps, at the last step and when stopping.

    The step's metrics are recorded first; if that ends the run (too many non-finite steps), the
    checkpoint of this step is still started (when its state is finite) before the error rises.
    """

    def __init__(self, ckpt: Checkpointer, every: int):
        self.ckpt, self.every = ckpt, every

    def due(self, loop: TrainLoop) -> bool:
        return super().due(loop) or loop.step == loop.last_step or loop.stopping

    def after_step(self, loop: TrainLoop) -> None:
        loop.last_saved = loop.step  # saved below, also when this step's record ends the run
        diverged = None
        try:
            loop.flush()
        except TrainingDiverged as e:
            diverged = e
        for hook in loop.hooks:
            hook.before_save(loop)
        loop.trainer.save(self.ckpt, loop.step, loop.state, loop.position)
        if diverged is not None:
            raise diverged

    def end(self, loop: TrainLoop) -> None:
        self.ckpt.wait()
        self.ckpt.close()


class LogHook(Hook):
    """A printed line ``step N: loss ... grad_norm ... lr ...`` every ``every`` steps (the loss with
    9 significant digits, which round-trips float32)."""

    def __init__(self, every: int, loss_scaling: bool = False):
        self.every, self.loss_scaling = every, loss_scaling

    def on_metrics(self, loop: TrainLoop, step: int, values: Mapping[str, float]) -> None:
        if "loss" not in values or not self.every or step % self.every:
            return
        line = f"step {step}: loss {values['loss']:.9g} grad_norm {values['grad_norm']:.6g} lr {values['lr']:.6g}"
        loop.show(line + (f" loss_scale {values['loss_scale']:g}" if self.loss_scaling else ""))


class ProgressBarHook(Hook):
    """A tqdm bar over the steps, with loss, tokens/s and MFU; messages print above it."""

    every = 0

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def start(self, loop: TrainLoop) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=loop.step, desc="train", dynamic_ncols=True)
        loop.write = self.bar.write  # printed above the bar, not into it

    def on_metrics(self, loop: TrainLoop, step: int, values: Mapping[str, float]) -> None:
        if "loss" not in values:
            return
        self.bar.update(1)
        extra = {"mfu": f"{values['mfu']:.1%}"} if "mfu" in values else {}
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_s']:.0f}", **extra)

    def end(self, loop: TrainLoop) -> None:
        if self.bar is not None:
            self.bar.close()
            loop.write = None


def default_hooks(
    cfg: Any, ckpt: Checkpointer | None, evaluate: Callable[[Any], float], loss_scaling: bool, is_main: bool
) -> list[Hook]:
    """The built-in hooks ``cfg`` (a :class:`jaxlm.config.Config`) asks for, in calling order."""
    t = cfg.train
    hooks: list[Hook] = [PreemptionHook()]
    if t.profile_steps:
        hooks.append(ProfilerHook(t.profile_steps[0], t.profile_steps[1], pathlib.Path(cfg.checkpoint.dir) / "profile"))
    hooks += [EvaluationHook(t.eval_every, evaluate), MetricsHook(cfg.checkpoint.dir or None)]
    if ckpt is not None:
        hooks.append(CheckpointHook(ckpt, cfg.checkpoint.save_every))
    hooks.append(LogHook(t.log_every, loss_scaling))
    if is_main and t.progress:
        hooks.append(ProgressBarHook(t.steps))
    return hooks


__all__ = [
    "CheckpointHook", "EvaluationHook", "Hook", "LogHook", "MetricsHook", "PreemptionHook", "ProfilerHook",
    "ProgressBarHook", "default_hooks",
]
