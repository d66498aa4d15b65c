"""Join a multi-process JAX job before any device is touched, and end it loudly when a peer is lost.

``initialize()`` reads the launcher's environment into :class:`DistributedSettings` and calls
``jax.distributed.initialize``. Three launchers are understood, first match wins:

* explicit  - ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (optional
  ``JAX_LOCAL_DEVICE_IDS=0,1``); what ``scripts/launch_local.sh`` sets;
* Slurm     - ``srun``'s ``SLURM_PROCID`` / ``SLURM_NTASKS`` / node list; the coordinator is the
  first node of the step (or job) node list, port ``JAX_COORDINATOR_PORT`` or one derived from
  the job id; with several tasks on a node each task gets GPU ``SLURM_LOCALID``;
* Open MPI  - ``OMPI_COMM_WORLD_SIZE`` / ``OMPI_COMM_WORLD_RANK``; the coordinator comes from
  ``JAX_COORDINATOR_ADDRESS`` (``mpirun -x JAX_COORDINATOR_ADDRESS=host0:12345``).

Without any of them (or with a single process) nothing happens: single-process runs need nothing.

Failure handling. JAX's coordination service already aborts every process when one stops sending
heartbeats, but its message is a C++ fatal log. On top of it each process runs a small watch
thread that publishes a heartbeat counter in the coordination key-value store every second and
ends the process with one clear line naming the lost process (exit code ``LOST_PEER_EXIT_CODE``)
once a peer's counter has not moved for ``JAXLM_HEARTBEAT_TIMEOUT_S`` seconds (default 30). JAX's
own heartbeat timeout is set 30 s longer as the backstop. A peer that never shows up ends the job
after ``JAXLM_INIT_TIMEOUT_S`` seconds (default 300). Call :func:`finish` when the work is done
so that a process which exits first is not reported as lost.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import os
import re
import sys
import threading
import time
from typing import Mapping

import jax

from sharding.errors import ConfigError, DistributedError

LOST_PEER_EXIT_CODE = DistributedError.exit_code  # 75, EX_TEMPFAIL: the job may be restarted from its last checkpoint
_KEY_PREFIX = "jaxlm/heartbeat/"
_MAX_TIMEOUT_S = 3600


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Where this process sits in a multi-process job."""

    coordinator_address: str  # "host:port" of process 0's coordination service
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None  # None: every local device
    source: str = "explicit"  # "explicit", "slurm" or "ompi"
    init_timeout_s: int = 300  # how long to wait for every process to connect
    heartbeat_timeout_s: int = 30  # a peer silent this long is declared lost


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _timeout(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name) if name in env else default
    if not 1 <= value <= _MAX_TIMEOUT_S:
        raise ConfigError(f"{name}={value} must be between 1 and {_MAX_TIMEOUT_S} seconds")
    return value


def first_slurm_host(node_list: str) -> str:
    """The first host of a Slurm node list: ``"gpu[003-010,012],cpu1"`` -> ``"gpu003"``."""
    m = re.match(r"([^,\[]*)(?:\[([^\],\-]+)[^\]]*\](.*?))?(?:,|$)", node_list.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ConfigError(f"cannot read the first host of the Slurm node list {node_list!r}")
    prefix, first, suffix = m.group(1), m.group(2) or "", m.group(3) or ""
    return prefix + first + suffix.split(",")[0]


def _local_device_ids(env: Mapping[str, str]) -> tuple[int, ...] | None:
    if "JAX_LOCAL_DEVICE_IDS" not in env:
        return None
    try:
        return tuple(int(x) for x in env["JAX_LOCAL_DEVICE_IDS"].split(","))
    except ValueError:
        raise ConfigError(f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']!r} must be comma-separated integers") from None


def _explicit(env: Mapping[str, str]) -> tuple[str, int, int, tuple[int, ...] | None] | None:
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [n for n in names if n in env]
    if not present or present == ["JAX_COORDINATOR_ADDRESS"]:  # alone, it only names a Slurm/MPI coordinator
        return None
    if len(present) < len(names):
        missing = ", ".join(n for n in names if n not in env)
        raise ConfigError(f"{', '.join(present)} set but {missing} missing; set all three to launch several processes")
    return env[names[0]], _int(env, names[1]), _int(env, names[2]), _local_device_ids(env)


def _slurm(env: Mapping[str, str]) -> tuple[str, int, int, tuple[int, ...] | None] | None:
    if not all(n in env for n in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")):
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodes:
        raise ConfigError("SLURM_PROCID is set but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is; launch with srun")
    port = _int(env, "JAX_COORDINATOR_PORT") if "JAX_COORDINATOR_PORT" in env else 61440 + _int(env, "SLURM_JOB_ID") % 4096
    address = env.get("JAX_COORDINATOR_ADDRESS") or f"{first_slurm_host(nodes)}:{port}"
    num = _int(env, "SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in env else _int(env, "SLURM_NTASKS")
    devices = _local_device_ids(env)
    tasks_on_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    if devices is None and "SLURM_LOCALID" in env and int(re.match(r"\d+", tasks_on_node).group()) > 1:
        devices = (_int(env, "SLURM_LOCALID"),)  # one task per GPU
    return address, num, _int(env, "SLURM_PROCID"), devices


def _ompi(env: Mapping[str, str]) -> tuple[str, int, int, tuple[int, ...] | None] | None:
    if not all(n in env for n in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")):
        return None
    num = _int(env, "OMPI_COMM_WORLD_SIZE")
    if num > 1 and "JAX_COORDINATOR_ADDRESS" not in env:
        raise ConfigError(
            "Open MPI launch without JAX_COORDINATOR_ADDRESS; pass it to every rank, "
            "e.g. mpirun -x JAX_COORDINATOR_ADDRESS=<host of rank 0>:12345"
        )
    devices = _local_device_ids(env)
    if devices is None and "OMPI_COMM_WORLD_LOCAL_SIZE" in env and _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") > 1:
        devices = (_int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),)  # one rank per GPU
    return env.get("JAX_COORDINATOR_ADDRESS", ""), num, _int(env, "OMPI_COMM_WORLD_RANK"), devices


def settings_from_env(env: Mapping[str, str]) -> DistributedSettings | None:
    """The job layout the environment describes, or None for a single-process run.

    Pure: reads only ``env``. Raises ConfigError (one line) for a half-specified or invalid layout.
    """
    for source, parse in (("explicit", _explicit), ("slurm", _slurm), ("ompi", _ompi)):
        found = parse(env)
        if found is not None:
            break
    else:
        if "JAX_COORDINATOR_ADDRESS" in env:
            raise ConfigError("JAX_COORDINATOR_ADDRESS set without a launcher; set JAX_NUM_PROCESSES and JAX_PROCESS_ID too")
        return None
    address, num, pid, devices = found
    if num == 1:
        return None
    if num < 1 or not 0 <= pid < num:
        raise ConfigError(f"process id {pid} is outside 0..{num - 1} ({source} launch with {num} processes)")
    if not re.fullmatch(r".+:\d+", address):
        raise ConfigError(f"coordinator address {address!r} must be host:port ({source} launch)")
    return DistributedSettings(
        coordinator_address=address,
        num_processes=num,
        process_id=pid,
        local_device_ids=devices,
        source=source,
        init_timeout_s=_timeout(env, "JAXLM_INIT_TIMEOUT_S", 300),
        heartbeat_timeout_s=_timeout(env, "JAXLM_HEARTBEAT_TIMEOUT_S", 30),
    )


def _jax_initialize_kwargs(s: DistributedSettings) -> dict:
    """Arguments for ``jax.distributed.initialize``, keeping only those this jax accepts."""
    wanted = {
        "coordinator_address": s.coordinator_address,
        "num_processes": s.num_processes,
        "process_id": s.process_id,
        "local_device_ids": list(s.local_device_ids) if s.local_device_ids is not None else None,
        "cluster_detection_method": "deactivate",  # the settings are complete; skip jax's own guessing
        "initialization_timeout": s.init_timeout_s,
        "heartbeat_timeout_seconds": s.heartbeat_timeout_s + 30,  # backstop behind the watch
        "shutdown_timeout_seconds": s.heartbeat_timeout_s + 30,
    }
    accepted = inspect.signature(jax.distributed.initialize).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


class _PeerWatch(threading.Thread):
    """Publishes this process's heartbeat and ends the process when a peer's stops."""

    def __init__(self, client, settings: DistributedSettings):
        super().__init__(name="jaxlm-peer-watch", daemon=True)
        self.client, self.s = client, settings
        self.stopped = threading.Event()

    def _lost(self, message: str) -> None:
        if self.stopped.is_set():
            return
        print(f"jaxlm: error: {message}; ending process {self.s.process_id}", file=sys.stderr, flush=True)
        os._exit(LOST_PEER_EXIT_CODE)

    def run(self) -> None:
        me, n = self.s.process_id, self.s.num_processes
        last_value: dict[int, str] = {}
        last_change = {p: time.monotonic() for p in range(n) if p != me}
        beat = 0
        while not self.stopped.wait(1.0):
            beat += 1
            try:
                self.client.key_value_set(f"{_KEY_PREFIX}{me}", str(beat), allow_overwrite=True)
                entries = self.client.key_value_dir_get(_KEY_PREFIX)
            except Exception as e:  # the coordination service lives in process 0
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                who = "the coordinator" if me != 0 else "the coordination service"
                self._lost(f"lost {who} (process 0 at {self.s.coordinator_address}): {first}")
                return
            now = time.monotonic()
            for key, value in entries:
                p = int(key.rsplit("/", 1)[-1])
                if p != me and value != last_value.get(p):
                    last_value[p], last_change[p] = value, now
            silent = sorted(p for p, t in last_change.items() if last_value.get(p) != "done" and now - t > self.s.heartbeat_timeout_s)
            if silent:
                names = ", ".join(map(str, silent))
                self._lost(f"lost process {names} of {n} (no heartbeat for {self.s.heartbeat_timeout_s} s)")
                return

    def finish(self) -> None:
        """Stop the watch and tell the peers this process ended on purpose."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            self.client.key_value_set(f"{_KEY_PREFIX}{self.s.process_id}", "done", allow_overwrite=True)
        except Exception:
            pass  # the peers are ending too; nothing left to tell


_watch: list[_PeerWatch] = []  # the running watch of this process (at most one)


def initialize(env: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """Join the job the environment describes (``os.environ`` by default); no-op for one process.

    Must run before anything touches a device (``jax.devices()``, any computation). Returns the
    settings used, or None for a single-process run.
    """
    settings = settings_from_env(os.environ if env is None else env)
    if settings is None or jax.distributed.is_initialized():
        return settings
    print(
        f"jaxlm: process {settings.process_id} of {settings.num_processes} joining {settings.coordinator_address} "
        f"({settings.source}; waiting up to {settings.init_timeout_s} s for every process)",
        file=sys.stderr,
        flush=True,
    )
    jax.distributed.initialize(**_jax_initialize_kwargs(settings))
    from jax._src import distributed as jax_distributed  # the connected client, for heartbeats

    client = getattr(jax_distributed.global_state, "client", None)
    if client is not None and hasattr(client, "key_value_dir_get"):
        watch = _PeerWatch(client, settings)
        watch.start()
        _watch.append(watch)
        atexit.register(lambda: watch.stopped.set())  # runs before jax's own shutdown barrier
    return settings


def finish() -> None:
    """Mark this process's work as done so peers still running do not report it lost."""
    while _watch:
        _watch.pop().finish()
