"""The training loop's hooks: user hooks run at their ``every`` and see the state the checkpoints
hold, a hook can stop the run (with a checkpoint of that step), the profiler writes a trace, and
``train.profile_steps`` is checked in one line."""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm.config import ConfigError
from jaxlm.hooks import Hook

from conftest import tiny_config


class Recorder(Hook):
    """Notes the steps it runs after and every metrics line."""

    def __init__(self, every: int):
        self.every = every
        self.after: list[int] = []
        self.losses: dict[int, float] = {}
        self.ended = False

    def after_step(self, loop):
        self.after.append(loop.step)

    def on_metrics(self, loop, step, values):
        if "loss" in values:
            self.losses[step] = values["loss"]

    def end(self, loop):
        self.ended = True


class Stopper(Hook):
    """At its first step: keeps a host copy of the parameters and asks the loop to stop."""

    def __init__(self, every: int):
        self.every, self.kept = every, None

    def after_step(self, loop):
        self.kept = jax.device_get(loop.state.params)
        loop.request_stop("test")


@pytest.fixture(scope="module")
def hooked_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hooks") / "run"
    cfg = tiny_config("train.steps=8", "train.warmup_steps=1", "train.eval_every=100", "train.eval_batches=1",
                      "checkpoint.save_every=3", "checkpoint.keep=5", f"checkpoint.dir={run}",
                      "train.profile_steps=[2, 3]")
    recorder, stopper = Recorder(every=2), Stopper(every=5)
    messages: list[str] = []
    result = jaxlm.train(cfg, log=messages.append, hooks=[recorder, stopper])
    return run, recorder, stopper, result, messages


def test_user_hook_runs_at_its_every_and_can_stop_the_run(hooked_run):
    run, recorder, _, result, messages = hooked_run
    assert recorder.after == [2, 4] and recorder.ended
    assert result.stopped_by == "test" and [h["step"] for h in result.history] == [1, 2, 3, 4, 5]
    assert recorder.losses == {int(h["step"]): h["loss"] for h in result.history}
    assert "received test at step 5: checkpoint saved, stopping" in messages
    # a stop asked by a hook that runs after the checkpoint hook still saves that step
    assert sorted(int(p.name) for p in run.iterdir() if p.name.isdigit()) == [3, 5]


def test_hook_sees_the_state_the_checkpoint_holds(hooked_run):
    run, _, stopper, _, _ = hooked_run
    model, _ = jaxlm.restore(run, step=5, log=lambda _: None)
    got, want = jax.device_get(nnx.state(model)), stopper.kept
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_profiler_writes_a_trace_of_the_steps(hooked_run):
    run, _, _, _, messages = hooked_run
    traces = list((run / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert f"profile of steps 2..3 written to {run / 'profile'}" in messages


@pytest.mark.parametrize("value, message", [
    ("[3]", r"must be \[from, to\] with 1 <= from <= to, got \[3\]"),
    ("[4, 2]", r"must be \[from, to\] with 1 <= from <= to, got \[4, 2\]"),
    ("[0, 2]", r"got \[0, 2\]"),
    ("steps", "must be a list of whole numbers such as"),
])
def test_profile_steps_are_checked(value, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tiny_config(f"train.profile_steps={value}", f"checkpoint.dir={tmp_path}")
    with pytest.raises(ConfigError, match="set checkpoint.dir"):
        tiny_config("train.profile_steps=[1, 2]")


class _Loop:
    """What PreemptionHook reads of a loop: the step and request_stop."""

    def __init__(self, step):
        self.step, self.stop_reason = step, None

    def request_stop(self, reason):
        self.stop_reason = self.stop_reason or reason


def test_preemption_hook_turns_a_signal_into_a_stop_after_the_step():
    import os
    import signal

    from jaxlm.hooks import PreemptionHook

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    hook, loop = PreemptionHook(), _Loop(step=3)
    hook.start(loop)
    try:
        hook.after_step(loop)
        assert loop.stop_reason is None
        os.kill(os.getpid(), signal.SIGTERM)  # one process: handled here, not by jax's preemption service
        hook.after_step(loop)
        assert loop.stop_reason == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        hook.end(loop)
    assert {s: signal.getsignal(s) for s in before} == before
