"""Multi-process runs on localhost: environment parsing, hybrid meshes, training and checkpoints
across real processes, and a lost peer ending the job."""

import json
import os
import pathlib
import queue
import select
import signal
import socket
import re
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError
from sharding.distributed import LOST_PEER_EXIT_CODE, DistributedSettings, jax_initialize_kwargs, settings_from_env
from sharding.mesh import make_mesh, split_across_processes

from conftest import REPO, XLA_CACHE, tiny_config, xla_flags

PREAMBLE = """
import jax
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
import jaxlm
from sharding import distributed
distributed.initialize()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, local_devices: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Process ``i`` of ``n`` on 127.0.0.1, with its own simulated CPU devices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_", "XLA_FLAGS"))}
    env.update(
        PYTHONPATH=REPO,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_flags(local_devices),
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(n),
        JAX_PROCESS_ID=str(i),
        JAXLM_INIT_TIMEOUT_S="60",
        **XLA_CACHE,
        **(extra or {}),
    )
    return env


def start_processes(snippet: str, n: int, local_devices: int = 2, extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start ``snippet`` (after PREAMBLE, which joins the job) in ``n`` processes of one job."""
    port = free_port()
    code = PREAMBLE + textwrap.dedent(snippet)
    return [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=process_env(i, n, port, local_devices, extra_env),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]


def finish_processes(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; all are killed once ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
            pytest.fail(f"process {procs.index(p)} still running after {timeout} s:\n{err[-3000:]}")
        results.append((p.returncode, out, err))
    return results


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float) -> None:
    """Read ``proc``'s stdout until a line starts with ``prefix``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return
            if not line:
                break  # the process ended
    proc.kill()
    pytest.fail(f"no line starting with {prefix!r} within {timeout} s:\n{proc.communicate()[1][-3000:]}")


def run_processes(snippet: str, n: int, local_devices: int = 2, timeout: float = 150) -> list[tuple[int, str, str]]:
    results = finish_processes(start_processes(snippet, n, local_devices), timeout)
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i} exited with {rc}:\n{err[-3000:]}"
    return results


# ---------------------------------------------------------------- environment parsing (pure)


def test_no_launcher_means_single_process():
    assert settings_from_env({}) is None
    assert settings_from_env({"HOME": "/root", "PATH": "/bin"}) is None
    assert settings_from_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}) is None
    assert settings_from_env({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}) is None


def test_explicit_env():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2",
           "JAXLM_HEARTBEAT_TIMEOUT_S": "12", "JAXLM_INIT_TIMEOUT_S": "40", "JAX_LOCAL_DEVICE_IDS": "0,1"}
    s = settings_from_env(env)
    assert s == DistributedSettings("explicit", 4, 2, "10.0.0.1:1234", 40, 12, pass_layout=True)
    assert jax_initialize_kwargs(s) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
        "initialization_timeout": 40, "heartbeat_timeout_seconds": 42, "shutdown_timeout_seconds": 42}
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID missing"):
        settings_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ConfigError, match="outside 0..1"):
        settings_from_env({**env, "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ConfigError, match="host:port"):
        settings_from_env({**env, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"})
    with pytest.raises(ConfigError, match="JAXLM_HEARTBEAT_TIMEOUT_S=0"):
        settings_from_env({**env, "JAXLM_HEARTBEAT_TIMEOUT_S": "0"})
    with pytest.raises(ConfigError, match="set JAX_NUM_PROCESSES and JAX_PROCESS_ID too"):
        settings_from_env({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(ConfigError, match="not an integer"):
        settings_from_env({**env, "JAX_PROCESS_ID": "one"})
    with pytest.raises(ConfigError, match="comma-separated integers"):
        settings_from_env({**env, "JAX_LOCAL_DEVICE_IDS": "0;1"})


def test_slurm_and_ompi_are_left_to_jax_detection():
    slurm = {"SLURM_JOB_ID": "4100", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_STEP_NODELIST": "gpu[007-010],cpu1"}
    s = settings_from_env(slurm)
    assert s == DistributedSettings("slurm", 8, 5, None, 300, 30, pass_layout=False)
    assert jax_initialize_kwargs(s) == {
        "initialization_timeout": 300, "heartbeat_timeout_seconds": 60, "shutdown_timeout_seconds": 60}
    with pytest.raises(ConfigError, match="start the tasks with srun"):
        settings_from_env({k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"})
    ompi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_MCA_orte_hnp_uri": "1.2.3.4;tcp://x"}
    assert settings_from_env(ompi) == DistributedSettings("ompi", 4, 3, None, 300, 30, pass_layout=False)
    no_uri = {k: v for k, v in ompi.items() if k != "OMPI_MCA_orte_hnp_uri"}
    with pytest.raises(ConfigError, match="mpirun -x JAX_COORDINATOR_ADDRESS"):
        settings_from_env(no_uri)
    given = settings_from_env({**no_uri, "JAX_COORDINATOR_ADDRESS": "node0:9999"})
    assert jax_initialize_kwargs(given)["coordinator_address"] == "node0:9999" and given.pass_layout


def test_no_private_jax_imports_in_the_package():
    private = re.compile(r"^\s*(from\s+jax\._src[\s.]|import\s+jax\._src)|importlib\.import_module\(\s*[\"']jax\._src")
    offenders = [f"{path.relative_to(REPO)}:{i}" for package in ("jaxlm", "sharding", "pallas_kernels")
                 for path in sorted(pathlib.Path(REPO, package).rglob("*.py"))
                 for i, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert offenders == []


def test_hybrid_split():
    # sizes in MESH_AXES order: (stage, data, fsdp, sequence, tensor)
    assert split_across_processes((1, 1, 4, 1, 1), 2, 2) == ((1, 1, 2, 1, 1), (1, 1, 2, 1, 1))
    assert split_across_processes((1, 2, 2, 1, 2), 4, 2) == ((1, 1, 1, 1, 2), (1, 2, 2, 1, 1))
    assert split_across_processes((1, 4, 2, 1, 1), 2, 4) == ((1, 2, 2, 1, 1), (1, 2, 1, 1, 1))
    assert split_across_processes((2, 1, 2, 1, 2), 4, 2) == ((1, 1, 1, 1, 2), (2, 1, 2, 1, 1))
    with pytest.raises(ConfigError, match="mesh.tensor=4 must divide the 2 devices of one process"):
        split_across_processes((1, 1, 1, 1, 4), 2, 2)
    with pytest.raises(ConfigError, match="cannot be split over 4 processes"):
        split_across_processes((1, 2, 1, 1, 4), 4, 8)


# ---------------------------------------------------------------- real processes

TRAIN_SNIPPET = """
import json
cfg = jaxlm.load_config("configs/tiny.yaml", {overrides!r})
result = jaxlm.train(cfg, log=lambda _: None)
distributed.finish()
mesh = jaxlm.make_mesh(cfg.mesh)
print(json.dumps({{"losses": [h["loss"] for h in result.history], "mesh": dict(mesh.shape),
                   "process_of_device": [[d.process_index for d in row.flat] for row in mesh.devices.reshape(-1, 2)]}}))
"""


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Two processes x two CPU devices train three steps of the tiny model and checkpoint it."""
    ckpt = tmp_path_factory.mktemp("two") / "run"
    overrides = ["train.steps=3", "train.warmup_steps=1", "train.progress=false", "train.eval_batches=1",
                 "mesh.data=1", "mesh.fsdp=4", f"checkpoint.dir={ckpt}"]
    results = run_processes(TRAIN_SNIPPET.format(overrides=overrides), n=2)
    return overrides, ckpt, [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]


@pytest.fixture(scope="module")
def one_process_reference(two_process_run):
    """The same run in this one process, on four of its devices in the same mesh shape."""
    overrides, _, _ = two_process_run
    cfg = tiny_config(*[o for o in overrides if not o.startswith("checkpoint.")])
    return cfg, jaxlm_train(cfg, make_mesh(cfg.mesh, jax.devices()[:4]))


def jaxlm_train(cfg, mesh):
    from jaxlm.train import train

    return train(cfg, mesh=mesh, log=lambda _: None)


@pytest.mark.slow
def test_two_processes_train_like_one(two_process_run, one_process_reference):
    _, _, reports = two_process_run
    _, ref = one_process_reference
    ref_losses = [h["loss"] for h in ref.history]
    assert len(ref_losses) == 3
    for r in reports:
        assert r["mesh"] == {"stage": 1, "data": 1, "fsdp": 4, "sequence": 1, "tensor": 1}
        assert r["process_of_device"] == [[0, 0], [1, 1]]  # fsdp crosses the processes
        np.testing.assert_allclose(r["losses"], ref_losses, rtol=2e-5)
    assert reports[0]["losses"] == reports[1]["losses"]


@pytest.mark.slow
def test_checkpoint_from_two_processes_restores_in_one(two_process_run, one_process_reference):
    from jaxlm.checkpoint import restore

    _, ckpt, _ = two_process_run
    cfg, ref = one_process_reference
    model, saved_cfg = restore(ckpt, mesh=make_mesh(cfg.mesh, jax.devices()[:4]))
    assert saved_cfg.model == cfg.model
    got, want = nnx.state(model), nnx.state(ref.model)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_four_processes_with_data_and_fsdp_across_them_train_like_one(devices):
    """4 processes x 2 devices, mesh data=2 x fsdp=4: both data-parallel axes cross processes."""
    overrides = ["train.steps=3", "train.warmup_steps=1", "train.progress=false", "train.eval_batches=1",
                 "mesh.data=2", "mesh.fsdp=4"]
    reports = [json.loads(out.strip().splitlines()[-1])
               for _, out, _ in run_processes(TRAIN_SNIPPET.format(overrides=overrides), n=4, timeout=240)]
    cfg = tiny_config(*overrides)
    ref = [h["loss"] for h in jaxlm_train(cfg, make_mesh(cfg.mesh, devices)).history]
    for r in reports:
        assert r["mesh"] == {"stage": 1, "data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
        np.testing.assert_allclose(r["losses"], ref, rtol=2e-5)
    # each process's two devices sit side by side on fsdp; processes tile data x fsdp
    assert sorted({tuple(row) for r in reports for row in r["process_of_device"]}) == [(0, 0), (1, 1), (2, 2), (3, 3)]


COLLECTIVE_LOOP = """
import time
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("x",))
x = jax.make_array_from_callback((8,), NamedSharding(mesh, P("x")), lambda idx: np.arange(8.0)[idx])
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
for i in range(600):
    assert float(total(x)) == 28.0
    print("step", i, flush=True)
    time.sleep(0.2)
"""


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_lost_process_ends_the_job(victim):
    procs = start_processes(COLLECTIVE_LOOP, n=2, extra_env={"JAXLM_HEARTBEAT_TIMEOUT_S": "5"})
    survivor = 1 - victim
    try:
        for p in procs:
            wait_for_line(p, "step", timeout=90)
        procs[victim].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = procs[survivor].communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[survivor].returncode not in (0, None)
    assert elapsed < 60
    if victim == 1:
        assert procs[survivor].returncode == LOST_PEER_EXIT_CODE, err[-3000:]
        assert "jaxlm: error: lost process 1 of 2 (no heartbeat for 5 s); ending process 0" in err
    else:  # the coordinator's death is seen at once, by our watch or by jax's own error polling
        assert "process 0" in err or "leader task" in err, err[-3000:]


# ---------------------------------------------------------------- stopping together (2 processes x 2 devices)

STOP_SNIPPET = """
import json, sys, time
from jaxlm.hooks import Hook

class Paced(Hook):  # announces every step on every process; the pause lets a signal land mid-run
    every = 1
    def after_step(self, loop):
        print(f"at step {{loop.step}}", flush=True)
        time.sleep({pace})

cfg = jaxlm.load_config("configs/tiny.yaml", {overrides!r})
result = jaxlm.train(cfg, log=lambda m: print(m, file=sys.stderr, flush=True), hooks=[Paced()])
distributed.finish()
print(json.dumps({{"stopped_by": result.stopped_by, "losses": {{int(h["step"]): h["loss"] for h in result.history}}}}))
"""
STOP_STEPS = 16


def stop_overrides(run) -> list[str]:
    return [f"train.steps={STOP_STEPS}", "train.warmup_steps=2", "train.progress=false", "train.eval_every=100",
            "train.eval_batches=1", "mesh.data=1", "mesh.fsdp=4", "checkpoint.save_every=4", "checkpoint.keep=2",
            f"checkpoint.dir={run}"]


class Job:
    """Two ``STOP_SNIPPET`` processes of one job; their ``at step N`` lines are read as they come."""

    def __init__(self, run, tmp_path, pace: float, extra_env: dict[str, str] | None = None):
        port = free_port()
        code = PREAMBLE + textwrap.dedent(STOP_SNIPPET.format(pace=pace, overrides=stop_overrides(run)))
        self.err_paths = [tmp_path / f"stderr-{i}-{time.monotonic_ns()}.txt" for i in range(2)]
        self.procs = []
        for i in range(2):
            with open(self.err_paths[i], "w") as err:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", code], env=process_env(i, 2, port, 2, extra_env), cwd=REPO,
                    stdout=subprocess.PIPE, stderr=err, text=True))
        self.lines: list[list[str]] = [[], []]
        self.queues = [queue.Queue(), queue.Queue()]
        for p, q in zip(self.procs, self.queues):
            threading.Thread(target=lambda p=p, q=q: [q.put(l.rstrip("\n")) for l in p.stdout] + [q.put(None)],
                             daemon=True).start()

    def _take(self, i: int, timeout: float) -> str | None:
        line = self.queues[i].get(timeout=timeout)
        if line is not None:
            self.lines[i].append(line)
        return line

    def wait_for_step(self, i: int, at_least: int, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._take(i, 1)
            except queue.Empty:
                continue
            if line is None:
                self.kill()
                pytest.fail(f"process {i} ended before step {at_least}:\n{self.stderr(i)[-3000:]}")
            if line.startswith("at step ") and int(line.split()[-1]) >= at_least:
                return int(line.split()[-1])
        self.kill()
        pytest.fail(f"process {i} reached no step {at_least} within {timeout} s:\n{self.stderr(i)[-3000:]}")

    def stderr(self, i: int) -> str:
        return self.err_paths[i].read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def finish(self, i: int, timeout: float) -> tuple[int, dict | None]:
        """Process ``i``'s exit code and final report (None when it printed none)."""
        try:
            rc = self.procs[i].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"process {i} still running after {timeout} s:\n{self.stderr(i)[-3000:]}")
        while (line := self._take(i, 10)) is not None:
            pass
        report = json.loads(self.lines[i][-1]) if self.lines[i] and self.lines[i][-1].startswith("{") else None
        return rc, report


def committed_steps(run) -> list[int]:
    return sorted(int(p.name) for p in run.iterdir() if p.name.isdigit())


def final_checksums(run) -> dict:
    from jaxlm.checkpoint import Checkpointer

    ckpt = Checkpointer(run, create=False)
    try:
        return ckpt.read_meta(STOP_STEPS)["checksums"]
    finally:
        ckpt.close()


def finish_both(job: Job, timeout: float = 300) -> list[dict]:
    reports = []
    for i in range(2):
        rc, report = job.finish(i, timeout)
        assert rc == 0 and report is not None, f"process {i} exited with {rc}:\n{job.stderr(i)[-3000:]}"
        reports.append(report)
    return reports


@pytest.fixture(scope="module")
def stop_reference(tmp_path_factory):
    """An uninterrupted two-process run: every step's loss and the final checkpoint's checksums."""
    tmp = tmp_path_factory.mktemp("stop-reference")
    reports = finish_both(Job(tmp / "run", tmp, pace=0))
    assert reports[0] == reports[1] and reports[0]["stopped_by"] is None
    assert sorted(map(int, reports[0]["losses"])) == list(range(1, STOP_STEPS + 1))
    return reports[0]["losses"], final_checksums(tmp / "run")


@pytest.mark.slow
def test_sigterm_to_one_then_both_stops_together_and_resumes_bit_identical(stop_reference, tmp_path):
    ref_losses, ref_sums = stop_reference
    run, seen = tmp_path / "run", {}

    # 1. SIGTERM to process 1 only (process 0 never sees a signal): both stop after the same step
    job = Job(run, tmp_path, pace=0.3)
    job.wait_for_step(0, 3)
    job.procs[1].send_signal(signal.SIGTERM)
    reports = finish_both(job)
    first_stop = max(map(int, reports[0]["losses"]))
    assert [r["stopped_by"] for r in reports] == ["SIGTERM", "SIGTERM"]
    assert reports[0] == reports[1]  # the same steps and losses on both
    assert first_stop < STOP_STEPS and committed_steps(run)[-1] == first_stop
    assert f"received SIGTERM at step {first_stop}: checkpoint saved" in job.stderr(0)
    seen.update(reports[0]["losses"])

    # 2. resume; SIGTERM to process 0, then to process 1 1.5 s later: one agreed stop, exit 0
    job = Job(run, tmp_path, pace=0.3)
    job.wait_for_step(1, first_stop + 2)
    job.procs[0].send_signal(signal.SIGTERM)
    time.sleep(1.5)
    job.procs[1].send_signal(signal.SIGTERM)
    reports = finish_both(job)
    second_stop = max(map(int, reports[0]["losses"]))
    assert f"resumed from step {first_stop} in {run}" in job.stderr(0)
    assert reports[0] == reports[1] and reports[0]["stopped_by"] == "SIGTERM"
    assert first_stop < second_stop < STOP_STEPS and committed_steps(run)[-1] == second_stop
    seen.update(reports[0]["losses"])

    # 3. resume to the end: every step's loss and the final state equal the uninterrupted run's
    reports = finish_both(Job(run, tmp_path, pace=0))
    assert reports[0]["stopped_by"] is None
    seen.update(reports[0]["losses"])
    assert seen == ref_losses
    assert final_checksums(run) == ref_sums


@pytest.mark.slow
def test_kill9_of_process_1_during_async_save_ends_process_0_and_resumes(stop_reference, tmp_path):
    ref_losses, ref_sums = stop_reference
    run, target, heartbeat_s = tmp_path / "run", 8, 5
    job = Job(run, tmp_path, pace=0.3, extra_env={"JAXLM_HEARTBEAT_TIMEOUT_S": str(heartbeat_s)})
    job.wait_for_step(0, 1)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(f"{target}.orbax-checkpoint-tmp") for p in run.iterdir()):
        assert job.procs[0].poll() is None and time.monotonic() < deadline, f"no save of step {target} seen"
        time.sleep(0.002)
    job.procs[1].kill()
    killed_at = time.monotonic()
    rc, report = job.finish(0, timeout=60)
    elapsed = time.monotonic() - killed_at
    job.kill()
    assert rc == LOST_PEER_EXIT_CODE and report is None, job.stderr(0)[-3000:]
    assert f"jaxlm: error: lost process 1 of 2 (no heartbeat for {heartbeat_s} s); ending process 0" in job.stderr(0)
    assert elapsed < heartbeat_s + 15
    assert committed_steps(run) == [target - 4], "the killed save must not commit"

    job = Job(run, tmp_path, pace=0)
    reports = finish_both(job)
    assert f"resumed from step {target - 4} in {run}" in job.stderr(0)
    assert reports[0]["losses"] == {k: v for k, v in ref_losses.items() if int(k) > target - 4}
    assert final_checksums(run) == ref_sums
