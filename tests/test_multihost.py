"""Multi-process runs on localhost: environment parsing, hybrid meshes, training and checkpoints
across real processes, and a lost peer ending the job."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError
from sharding.distributed import LOST_PEER_EXIT_CODE, DistributedSettings, first_slurm_host, settings_from_env
from sharding.mesh import make_mesh, split_across_processes

from conftest import REPO, tiny_config

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
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(n),
        JAX_PROCESS_ID=str(i),
        JAXLM_INIT_TIMEOUT_S="60",
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
    assert settings_from_env(env) == DistributedSettings("10.0.0.1:1234", 4, 2, (0, 1), "explicit", 40, 12)
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


def test_slurm_env():
    base = {"SLURM_JOB_ID": "4100", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
            "SLURM_STEP_NODELIST": "gpu[007-010],cpu1", "SLURM_JOB_NODELIST": "other"}
    s = settings_from_env({**base, "SLURM_STEP_TASKS_PER_NODE": "2(x4)"})
    assert s == DistributedSettings(f"gpu007:{61440 + 4100 % 4096}", 8, 5, (1,), "slurm", 300, 30)
    one_per_node = settings_from_env({**base, "SLURM_STEP_TASKS_PER_NODE": "1(x8)", "JAX_COORDINATOR_PORT": "5000"})
    assert one_per_node.coordinator_address == "gpu007:5000" and one_per_node.local_device_ids is None
    job_list = {k: v for k, v in base.items() if k != "SLURM_STEP_NODELIST"}
    assert settings_from_env(job_list).coordinator_address.startswith("other:")
    assert [first_slurm_host(x) for x in ("n1", "n1,n2", "n[001-004],x", "n[3,5-7]", "r[2-3]-ib,z")] == [
        "n1", "n1", "n001", "n3", "r2-ib"]


def test_ompi_env():
    env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "JAX_COORDINATOR_ADDRESS": "node0:9999"}
    assert settings_from_env(env) == DistributedSettings("node0:9999", 4, 3, (1,), "ompi", 300, 30)
    with pytest.raises(ConfigError, match="mpirun -x JAX_COORDINATOR_ADDRESS"):
        settings_from_env({k: v for k, v in env.items() if k != "JAX_COORDINATOR_ADDRESS"})


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
