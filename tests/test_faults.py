"""Faults: non-finite steps are skipped, signals save and resume, kill -9 and corrupt checkpoints recover.

The in-process tests poison a batch with an out-of-range token id: the embedding lookup fills it
with NaN, so the loss and gradients go non-finite exactly as corrupt data would make them. The
process-level tests run ``jaxlm train`` as a user would and compare every logged loss (printed
with 9 significant digits, which round-trips float32) against one uninterrupted run.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

import jaxlm
from jaxlm.checkpoint import Checkpointer, tree_checksum
from jaxlm.config import MeshConfig
from jaxlm.data import PackedLoader, load_splits, load_tokenizer, to_global_batch
from jaxlm.train import Trainer, TrainingDiverged
from sharding.mesh import make_mesh
from tests.conftest import REPO, batches_and_params, tiny_config

STEP_LINE = re.compile(r"^step (\d+): loss ")


# ---------------------------------------------------------------- non-finite guard (in process)


def _poisoning_loader(bad_index, vocab_size):
    """A loader whose training batches ``i`` with ``bad_index(i)`` hold one out-of-range token
    (row 1, position 5): the embedding gather fills that row with NaN."""

    class Poisoned(PackedLoader):
        def rows(self, index, rows=slice(None)):
            out = super().rows(index, rows)
            global_rows = np.arange(self.batch_size)[rows]
            if self.shuffle and bad_index(index) and 1 in global_rows:
                out = {**out, "inputs": out["inputs"].copy()}
                out["inputs"][list(global_rows).index(1), 5] = vocab_size
            return out

    return Poisoned


@pytest.fixture(scope="module")
def one_device(devices):
    return make_mesh(MeshConfig(), devices[:1])


def test_nonfinite_batch_is_skipped_and_other_steps_match_a_run_without_it(one_device):
    cfg = tiny_config("train.steps=5", "train.warmup_steps=1")
    splits = load_splits(cfg.data, load_tokenizer())
    loader = _poisoning_loader(lambda i: i == 2, cfg.model.vocab_size)(
        splits.train, cfg.data.seq_len, cfg.train.batch_size, seed=0)
    windows = [loader.batch(i) for i in range(5)]
    params = jax.device_get(nnx.state(jaxlm.build_model(cfg.model, seed=0)))
    trainer = Trainer(cfg, one_device)

    def run(ws):
        state, out = trainer.init_state(params), []
        for w in ws:
            state, m = trainer.step(state, to_global_batch(w, one_device))
            out.append(jax.device_get(m))
        return state, out

    poisoned, m_p = run(windows)
    clean, m_c = run(windows[:2] + windows[3:])
    assert [int(m["skipped"]) for m in m_p] == [0, 0, 1, 0, 0]
    assert [int(m["skipped"]) for m in m_c] == [0, 0, 0, 0]
    assert not np.isfinite(m_p[2]["loss"])
    # the skipped step changed nothing: every other loss and the final state equal the clean run bit for bit
    assert [float(m["loss"]) for i, m in enumerate(m_p) if i != 2] == [float(m["loss"]) for m in m_c]
    for a, b in zip(jax.tree.leaves((poisoned.params, poisoned.opt_state)), jax.tree.leaves((clean.params, clean.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(poisoned.params))
    # step counts batches consumed; the optimizer's own counter counts applied updates
    assert int(poisoned.step) == 5 and int(clean.step) == 4


def test_train_reports_skips_and_stops_after_too_many_in_a_row(one_device, tmp_path, monkeypatch):
    # batch 2 is bad (step 3 skips, the run goes on); every batch from 5 on is bad (steps 6, 7, 8 skip: stop)
    run = tmp_path / "run"
    cfg = tiny_config(
        "train.steps=12", "train.warmup_steps=1", "train.eval_every=100", "train.eval_batches=1",
        "train.max_consecutive_skips=3", f"checkpoint.dir={run}", "checkpoint.save_every=2", "checkpoint.keep=5",
    )
    bad = lambda i: i == 2 or i >= 5  # noqa: E731
    monkeypatch.setattr(sys.modules["jaxlm.train"], "PackedLoader", _poisoning_loader(bad, cfg.model.vocab_size))
    lines = []
    with pytest.raises(TrainingDiverged, match=r"stopped at step 8: 3 consecutive steps .* last good checkpoint is step 8"):
        jaxlm.train(cfg, mesh=one_device, log=lines.append)
    skip_lines = [line for line in lines if "update skipped" in line]
    assert [line.split(":")[0] for line in skip_lines] == ["step 3", "step 6", "step 7", "step 8"]
    assert skip_lines[0].endswith("(1 in a row, 1 in all)") and skip_lines[-1].endswith("(3 in a row, 4 in all)")
    ckpt = Checkpointer(run, create=False)
    assert ckpt.all_steps() == [2, 4, 6, 8]
    sums = {s: ckpt.read_meta(s)["checksums"] for s in (4, 6, 8)}
    ckpt.close()
    # the checkpoints written during the skips hold the last good state (after step 5), bit for bit
    assert sums[6] == sums[8] != sums[4]
    model, _ = jaxlm.restore(run, mesh=one_device, step=8)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(nnx.state(model)))


def test_update_that_would_make_the_state_non_finite_is_skipped(one_device):
    """A NaN learning rate (as ``train.learning_rate=.nan`` once was accepted) leaves the loss and
    gradients finite but the update NaN: the step is skipped and the state is unchanged, bit for bit."""
    good = tiny_config("train.steps=2", "train.warmup_steps=1")
    cfg = good.replace(train=dataclasses.replace(good.train, learning_rate=float("nan")))  # past validation
    batch, params = batches_and_params(cfg, 1)
    trainer = Trainer(cfg, one_device)
    state = trainer.init_state(params)
    before = jax.device_get((state.params, state.opt_state))
    state, m = trainer.step(state, to_global_batch(batch[0], one_device))
    assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))  # the old guard saw nothing
    assert int(m["skipped"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get((state.params, state.opt_state)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_checkpoint_is_written_from_a_non_finite_state(one_device, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config("train.steps=4", "train.warmup_steps=1", "train.eval_batches=1", f"checkpoint.dir={run}",
                      "checkpoint.save_every=2")
    model = jaxlm.build_model(cfg.model, seed=0)
    model.final_norm.scale[...] = model.final_norm.scale[...].at[0].set(np.nan)  # every loss is NaN
    with pytest.raises(TrainingDiverged, match=r"^not saving step 2: its parameters or optimizer state are not finite"):
        jaxlm.train(cfg, model, mesh=one_device, log=lambda _: None)
    assert not [p for p in run.iterdir() if p.name[0].isdigit()]  # no step directory, not even a torn one
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["skipped"] for line in lines] == [1.0, 1.0]


# ---------------------------------------------------------------- process-level faults


RUN_ARGS = (
    "train", "configs/tiny.yaml", "train.steps=20", "train.warmup_steps=2", "train.progress=false",
    "train.eval_every=100", "train.eval_batches=1", "train.log_every=1", "checkpoint.save_every=4",
)


@pytest.fixture(autouse=True)
def _own_compilation_cache(tmp_path, monkeypatch):
    """A kill -9 during a persistent-cache write leaves a torn entry: keep these runs' entries to themselves."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla-cache"))


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO)


def _run(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.cli", *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


class _Live:
    """A ``jaxlm train`` subprocess whose stdout lines are read as they come."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jaxlm.cli", *args], cwd=REPO, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self.ended = False  # the end of its stdout has been read
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for_step(self, at_least: int, timeout: float = 180, *, fail: bool = True) -> int | None:
        """Read lines until step ``at_least`` is logged; after ``timeout`` seconds fail, or with
        ``fail=False`` return None (the run still going)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=min(1.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                continue
            if line is None:
                self.ended = True
                raise AssertionError("run ended early:\n" + "\n".join(self.lines))
            self.lines.append(line)
            m = STEP_LINE.match(line)
            if m and int(m.group(1)) >= at_least:
                return int(m.group(1))
        if not fail:
            return None
        raise AssertionError(f"no step {at_least} within {timeout}s:\n" + "\n".join(self.lines))

    def finish(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout=timeout)
        while not self.ended:
            line = self._q.get(timeout=10)
            if line is None:
                self.ended = True
            else:
                self.lines.append(line)
        return rc


def _step_lines(text_lines):
    return {int(m.group(1)): line for line in text_lines if (m := STEP_LINE.match(line))}


def _committed(run: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in run.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 20-step run: its per-step lines and its checkpoints (12, 16, 20)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    r = _run(*RUN_ARGS, f"checkpoint.dir={run}", "checkpoint.keep=3")
    assert r.returncode == 0, r.stderr
    lines = _step_lines(r.stdout.splitlines())
    assert sorted(lines) == list(range(1, 21)) and _committed(run) == [12, 16, 20]
    return run, lines


def _final_checksums(run):
    ckpt = Checkpointer(run, create=False)
    try:
        return ckpt.read_meta(20)["checksums"]
    finally:
        ckpt.close()


@pytest.mark.slow
def test_sigterm_then_kill9_during_save_resume_bit_identical(reference, tmp_path):
    ref_run, ref_lines = reference
    run = tmp_path / "run"
    rng = random.Random()
    args = (*RUN_ARGS, f"checkpoint.dir={run}", "checkpoint.keep=1")
    seen: dict[int, str] = {}

    # 1. SIGTERM at a random step: a checkpoint at that step, exit 0
    live = _Live(*args)
    live.wait_for_step(rng.randint(2, 6))
    live.proc.send_signal(signal.SIGTERM)
    assert live.finish() == 0, "\n".join(live.lines)
    stopped = int(re.search(r"received SIGTERM at step (\d+): checkpoint saved", "\n".join(live.lines)).group(1))
    assert _committed(run) == [stopped]
    seen.update(_step_lines(live.lines))

    # 2. resume, then kill -9 while an asynchronous save is being written
    target = rng.choice([s for s in (8, 12, 16) if s > stopped])
    live = _Live(*args)
    live.wait_for_step(stopped + 1)
    assert f"resumed from step {stopped} in {run}" in live.lines
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f"{target}.orbax-checkpoint-tmp") for p in run.iterdir()):
        assert live.proc.poll() is None and time.monotonic() < deadline, f"no save of step {target} seen"
        time.sleep(0.002)
    live.proc.kill()
    live.finish()
    torn = [p.name for p in run.iterdir() if "orbax-checkpoint-tmp" in p.name]
    assert torn, "the kill came after the save committed"
    # keep=1 never deleted the last committed step while the new one was torn
    last_good = max([stopped] + [s for s in (4, 8, 12, 16) if stopped < s < target])
    assert _committed(run) == [last_good]
    seen.update(_step_lines(live.lines))

    # 3. resume past the torn save (it is ignored) and run to the end
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    assert f"resumed from step {last_good} in {run}" in r.stdout
    seen.update(_step_lines(r.stdout.splitlines()))

    assert sorted(seen) == list(range(1, 21))
    assert [seen[s] for s in range(1, 21)] == [ref_lines[s] for s in range(1, 21)]
    assert _final_checksums(run) == _final_checksums(ref_run)  # parameters and optimizer state, bit for bit


def _garble(step_dir: pathlib.Path, truncate: bool) -> None:
    big = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    if truncate:
        data = data[: len(data) // 2]
    else:  # flip 256 bytes in the middle of the largest data file: array values, not its framing
        mid = len(data) // 2
        data[mid : mid + 256] = bytes(b ^ 0x5A for b in data[mid : mid + 256])
    big.write_bytes(bytes(data))


def test_corrupt_latest_checkpoints_fall_back_to_the_previous_good_step(reference, tmp_path):
    ref_run, ref_lines = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    _garble(run / "20", truncate=True)  # unreadable
    _garble(run / "16", truncate=False)  # readable, wrong bytes: caught by the checksum
    r = _run(*RUN_ARGS, f"checkpoint.dir={run}", "checkpoint.keep=3")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "step 20" in warnings[0] and "cannot be restored" in warnings[0] and "set aside as 20.corrupt" in warnings[0]
    assert "step 16" in warnings[1] and "checksum" in warnings[1] and "set aside as 16.corrupt" in warnings[1]
    assert f"resumed from step 12 in {run}" in r.stdout
    lines = _step_lines(r.stdout.splitlines())
    assert [lines[s] for s in range(13, 21)] == [ref_lines[s] for s in range(13, 21)]
    assert (run / "20.corrupt").is_dir() and (run / "16.corrupt").is_dir() and _committed(run) == [12, 16, 20]


def test_when_no_checkpoint_restores_nothing_is_renamed_and_the_run_refused(reference, tmp_path):
    ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    for step in (12, 16, 20):
        _garble(run / str(step), truncate=step == 20)
    before = _tree_digest(run)
    cfg = tiny_config(*RUN_ARGS[2:], f"checkpoint.dir={run}")
    with pytest.raises(jaxlm.CheckpointError, match=r"^no checkpoint in .* can be restored \(checkpoint step 20 .*--force"):
        jaxlm.train(cfg, log=lambda _: None)
    assert _tree_digest(run) == before


def test_checksum_sees_one_changed_bit_and_a_swap():
    tree = {"a": jax.random.normal(jax.random.key(0), (4, 8)), "b": {"c": jax.random.randint(jax.random.key(1), (5,), 0, 9)}}
    base = tree_checksum(tree)
    assert tree_checksum(jax.tree.map(lambda x: x + 0, tree)) == base
    flipped = np.asarray(tree["a"]).copy()
    flipped.view(np.uint32)[2, 3] ^= 1  # the lowest mantissa bit of one element
    assert tree_checksum({**tree, "a": flipped}) != base
    swapped = np.asarray(tree["a"]).copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert tree_checksum({**tree, "a": swapped}) != base


def _tree_digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_incompatible_run_directory_refused_unless_force(reference, tmp_path):
    ref_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_run, run)
    before = _tree_digest(run)
    r = _run(*RUN_ARGS, f"checkpoint.dir={run}", "model.mlp_dim=128")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"jaxlm: error: checkpoint directory '{run}' holds a run with a different model (model.mlp_dim differ); "
        "use a new checkpoint.dir, or --force to set it aside"
    ]
    assert _tree_digest(run) == before  # nothing written, nothing moved

    r = _run(*RUN_ARGS, f"checkpoint.dir={run}", "model.mlp_dim=128", "train.steps=2", "--force")
    assert r.returncode == 0, r.stderr
    assert "moved its checkpoints to" in r.stdout and "resumed" not in r.stdout
    (aside,) = [p for p in run.iterdir() if p.name.startswith("superseded-")]
    assert _tree_digest(aside) == before  # the old run is kept whole, only moved
    assert _committed(run) == [2]
    ckpt = Checkpointer(run, create=False)
    assert ckpt.read_config().model.mlp_dim == 128
    ckpt.close()


TIMING = ("step_time_s", "tokens_per_s", "mfu", "memory_bytes")  # wall-clock figures differ run to run


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.slow
def test_metrics_log_after_ten_random_kills_equals_the_uninterrupted_one(reference, tmp_path):
    """kill -9 at 10 random moments (start-up and compilation, mid-run, around saves), resuming
    each time: metrics.jsonl holds exactly one line per step, equal (timings aside) to the
    uninterrupted run's, with no step missing or repeated."""
    ref_run, _ = reference
    run = tmp_path / "run"
    args = (*RUN_ARGS, f"checkpoint.dir={run}", "checkpoint.keep=3")
    rng = random.Random(20261129)
    alive_when_killed = 0
    for kill in range(10):
        live = _Live(*args)
        try:
            if kill % 3 == 0:  # start-up, compilation or the first steps; step 19 at the latest
                live.wait_for_step(19, timeout=rng.uniform(0.5, 8.0), fail=False)
            else:
                live.wait_for_step(rng.randint(1, 19))
                time.sleep(rng.uniform(0.0, 0.3))
        except AssertionError:
            pass  # the run ended before the chosen moment: nothing left to kill
        alive_when_killed += live.proc.poll() is None
        live.proc.kill()
        live.finish()
    assert alive_when_killed >= 8  # the kills did land in running processes
    r = _run(*args)
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in r.stdout
    ref, got = _metrics(ref_run), _metrics(run)
    assert [row["step"] for row in got] == list(range(1, 21))
    assert got == ref
