"""The loop over training steps, with the hooks (:mod:`jaxlm.hooks`) around each step.

:class:`TrainLoop` runs the compiled step, reads each step's metrics one step late (so the host
never waits for the device), stops the run with :class:`TrainingDiverged` after too many
non-finite steps in a row, and leaves everything else to its hooks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

import jax

from jaxlm.errors import JaxlmError
from jaxlm.metrics import device_memory_in_use, model_flops_per_token, peak_flops

if TYPE_CHECKING:
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.hooks import Hook
    from jaxlm.train import Trainer, TrainState


class TrainingDiverged(JaxlmError, RuntimeError):
    """Too many consecutive steps had a non-finite loss, gradients or update; the run stopped
    (exit code 1), or a state to be checkpointed was not finite (it is not saved)."""

    exit_code = 1


class TrainLoop:
    """The loop over steps: runs the compiled step, reads each step's metrics one step late (so
    the host never waits for the device), and calls the hooks (:mod:`jaxlm.hooks`)."""

    def __init__(
        self,
        trainer: Trainer,
        state: TrainState,
        position: int,
        next_batch: Callable[[int], dict[str, jax.Array]],
        hooks: Sequence[Hook],
        last_step: int,
        say: Callable[[str], None],
        ckpt: Checkpointer | None = None,
        last_saved: int | None = None,
    ):
        self.trainer, self.cfg, self.state, self.position = trainer, trainer.cfg, state, position
        self.next_batch, self.hooks, self.last_step, self.say = next_batch, list(hooks), last_step, say
        self.ckpt, self.last_saved = ckpt, last_saved
        self.step = int(state.step)
        self.history: list[dict[str, float]] = []
        self.skipped: list[int] = []
        self.stop_reason: str | None = None
        self.write: Callable[[str], None] | None = None  # set by a progress bar: print above it
        self._pending: tuple[int, dict[str, jax.Array]] | None = None
        self._last_time = time.perf_counter()
        cfg = self.cfg
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_step = model_flops_per_token(cfg.model, cfg.data.seq_len) * self.tokens_per_step
        device_peak = peak_flops(jax.devices()[0].device_kind, cfg.model.compute_dtype)
        self.mesh_peak = None if device_peak is None else device_peak * trainer.mesh.size  # None: no MFU

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def request_stop(self, reason: str) -> None:
        """Stop after the current step (a checkpoint of it is saved when checkpointing is on)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def show(self, message: str) -> None:
        (self.write or self.say)(message)

    def write_metrics(self, step: int, values: dict[str, float]) -> None:
        for hook in self.hooks:
            hook.on_metrics(self, step, values)

    def flush(self) -> None:
        """Record the pending step's metrics now (blocks until that step has run)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._record(*pending)

    def _record(self, step: int, metrics: dict[str, jax.Array]) -> None:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        step_time = max(now - self._last_time, 1e-9)  # between metric reads: includes compilation at first
        values.update(step=step, step_time_s=step_time, tokens_per_s=self.tokens_per_step / step_time)
        if self.mesh_peak is not None:
            values["mfu"] = self.flops_per_step / step_time / self.mesh_peak
        memory = device_memory_in_use()
        if memory is not None:
            values["memory_bytes"] = float(memory)
        self._last_time = now
        self.history.append(values)
        diverged = None
        if values["skipped"]:
            self.skipped.append(step)
            in_a_row = next((i for i, h in enumerate(reversed(self.history)) if not h["skipped"]), len(self.history))
            self.show(
                f"step {step}: non-finite loss, gradients or update (loss {values['loss']}), update skipped "
                f"({in_a_row} in a row, {len(self.skipped)} in all)"
            )
            limit = self.cfg.train.max_consecutive_skips
            if in_a_row >= limit:
                where = f"; the last good checkpoint is step {self.last_saved} in {self.ckpt.directory}" if self.last_saved else ""
                diverged = TrainingDiverged(
                    f"stopped at step {step}: {in_a_row} consecutive steps had a non-finite loss, gradients or update "
                    f"(train.max_consecutive_skips={limit}){where}; lower train.learning_rate or check the data"
                )
        self.write_metrics(step, values)
        if diverged is not None:
            raise diverged

    def run(self) -> None:
        """Steps ``state.step + 1 .. last_step``, or until a hook requests a stop."""
        ended = False
        try:
            for hook in self.hooks:
                hook.start(self)
            for step in range(self.step + 1, self.last_step + 1):
                self.step = step
                for hook in self.hooks:
                    hook.before_step(self)
                batch = self.next_batch(self.position)
                self.position += 1
                self.state, metrics = self.trainer.step(self.state, batch)
                self.flush()  # the previous step's metrics, read while this one runs
                self._pending = (step, metrics)
                ran = []
                for hook in self.hooks:
                    ran.append(hook.due(self))
                    if ran[-1]:
                        hook.after_step(self)
                if self.stopping:  # hooks due because of the stop (the checkpoint) that had not run yet
                    for hook, done in zip(self.hooks, ran):
                        if not done and hook.due(self):
                            hook.after_step(self)
                    self.flush()
                    saved = "checkpoint saved, stopping" if self.ckpt is not None else "stopping"
                    self.show(f"received {self.stop_reason} at step {step}: {saved}")
                    break
            self.flush()
            ended = True
        finally:
            errors = []
            for hook in self.hooks:
                try:
                    hook.end(self)
                except Exception as e:  # every hook ends; the first error rises (after the loop's own)
                    errors.append(e)
            if errors and ended:
                raise errors[0]
