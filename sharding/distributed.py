"""Join a multi-process JAX job before any device is touched, and end it loudly when a peer is lost.

``initialize()`` calls ``jax.distributed.initialize``, whose own cluster detection finds the
coordinator, the process count and id (and, on GPUs, one device per task) from the launcher:

* explicit  - ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (optional
  ``JAX_LOCAL_DEVICE_IDS=0,1``, read by jax); what ``scripts/launch_local.sh`` sets;
* Slurm     - ``srun``'s ``SLURM_*`` variables (jax's ``SlurmCluster``: coordinator on the first
  node of the step, port ``JAX_COORDINATOR_PORT`` or one derived from the job id);
* Open MPI  - ``mpirun``'s ``OMPI_*`` variables (jax's ``OmpiCluster``); without
  ``OMPI_MCA_orte_hnp_uri`` (Open MPI 5) pass ``JAX_COORDINATOR_ADDRESS`` to every rank.

Without any of them (or with a single process) nothing happens. What this module adds to jax:

* one-line errors (:class:`~sharding.errors.ConfigError`) for a half-specified layout, before jax
  is called, and a :class:`~sharding.errors.DistributedError` naming the coordinator when the job
  cannot form within ``JAXLM_INIT_TIMEOUT_S`` seconds (default 300);
* jax's preemption service switched on, so ``jax.experimental.multihost_utils.
  reached_preemption_sync_point`` lets every process stop after the same step (``jaxlm.hooks``);
* the lost-peer watch (:mod:`sharding.peer_watch`): a peer silent for ``JAXLM_HEARTBEAT_TIMEOUT_S``
  seconds (default 30) ends this process with one line naming it and exit code
  ``LOST_PEER_EXIT_CODE`` (75). jax's own heartbeat timeout is set 30 s longer as the backstop.

Call :func:`finish` when the work is done so that a process which exits first is not reported lost.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import sys
from typing import Mapping

import jax

from sharding.errors import ConfigError, DistributedError
from sharding.peer_watch import PeerWatch, coordination_client

LOST_PEER_EXIT_CODE = DistributedError.exit_code  # 75, EX_TEMPFAIL: the job may be restarted from its last checkpoint
_MAX_TIMEOUT_S = 3600
_BACKSTOP_S = 30  # jax's own heartbeat/shutdown timeouts exceed ours by this much


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Where this process sits in a multi-process job, as read from the launcher's environment."""

    source: str  # "explicit", "slurm" or "ompi"
    num_processes: int
    process_id: int
    coordinator_address: str | None = None  # "host:port"; None: jax's cluster detection finds it
    init_timeout_s: int = 300  # how long to wait for every process to connect
    heartbeat_timeout_s: int = 30  # a peer silent this long is declared lost
    pass_layout: bool = False  # give jax the address, count and id (it cannot detect them itself)


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


def _check_local_device_ids(env: Mapping[str, str]) -> None:
    if "JAX_LOCAL_DEVICE_IDS" in env and not re.fullmatch(r"\d+(,\d+)*", env["JAX_LOCAL_DEVICE_IDS"]):
        raise ConfigError(f"JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']!r} must be comma-separated integers")


def _explicit(env: Mapping[str, str]) -> tuple[str | None, int, int, bool] | None:
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [n for n in names if n in env]
    if not present or present == ["JAX_COORDINATOR_ADDRESS"]:  # alone, it only names a Slurm/MPI coordinator
        return None
    if len(present) < len(names):
        missing = ", ".join(n for n in names if n not in env)
        raise ConfigError(f"{', '.join(present)} set but {missing} missing; set all three to launch several processes")
    return env[names[0]], _int(env, names[1]), _int(env, names[2]), True


def _slurm(env: Mapping[str, str]) -> tuple[str | None, int, int, bool] | None:
    if not all(n in env for n in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS")):
        return None
    num = _int(env, "SLURM_NTASKS")
    if num > 1 and not all(n in env for n in ("SLURM_STEP_NODELIST", "SLURM_LOCALID")):
        raise ConfigError("SLURM_NTASKS > 1 but SLURM_STEP_NODELIST or SLURM_LOCALID is not set; start the tasks with srun")
    return env.get("JAX_COORDINATOR_ADDRESS"), num, _int(env, "SLURM_PROCID"), False


def _ompi(env: Mapping[str, str]) -> tuple[str | None, int, int, bool] | None:
    if not all(n in env for n in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")):
        return None
    num, address = _int(env, "OMPI_COMM_WORLD_SIZE"), env.get("JAX_COORDINATOR_ADDRESS")
    detected = "OMPI_MCA_orte_hnp_uri" in env  # what jax's OmpiCluster reads the coordinator from
    if num > 1 and not detected and address is None:
        raise ConfigError(
            "Open MPI launch without OMPI_MCA_orte_hnp_uri or JAX_COORDINATOR_ADDRESS; pass it to every rank, "
            "e.g. mpirun -x JAX_COORDINATOR_ADDRESS=<host of rank 0>:12345"
        )
    return address, num, _int(env, "OMPI_COMM_WORLD_RANK"), not detected


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
    address, num, pid, pass_layout = found
    if num == 1:
        return None
    if num < 1 or not 0 <= pid < num:
        raise ConfigError(f"process id {pid} is outside 0..{num - 1} ({source} launch with {num} processes)")
    if address is not None and not re.fullmatch(r".+:\d+", address):
        raise ConfigError(f"coordinator address {address!r} must be host:port ({source} launch)")
    _check_local_device_ids(env)
    return DistributedSettings(
        source=source,
        num_processes=num,
        process_id=pid,
        coordinator_address=address,
        init_timeout_s=_timeout(env, "JAXLM_INIT_TIMEOUT_S", 300),
        heartbeat_timeout_s=_timeout(env, "JAXLM_HEARTBEAT_TIMEOUT_S", 30),
        pass_layout=pass_layout,
    )


def jax_initialize_kwargs(s: DistributedSettings) -> dict:
    """Arguments for ``jax.distributed.initialize`` (jax 0.10): timeouts always, the layout only
    where jax's cluster detection cannot find it."""
    kwargs: dict = {
        "initialization_timeout": s.init_timeout_s,
        "heartbeat_timeout_seconds": s.heartbeat_timeout_s + _BACKSTOP_S,
        "shutdown_timeout_seconds": s.heartbeat_timeout_s + _BACKSTOP_S,
    }
    if s.pass_layout:
        kwargs.update(coordinator_address=s.coordinator_address, num_processes=s.num_processes, process_id=s.process_id)
    return kwargs


_watch: list[PeerWatch] = []  # the running watch of this process (at most one)


def initialize(env: Mapping[str, str] | None = None) -> DistributedSettings | None:
    """Join the job the environment describes (``os.environ`` by default); no-op for one process.

    Must run before anything touches a device (``jax.devices()``, any computation). Returns the
    settings used, or None for a single-process run. Raises ConfigError for a bad layout and
    DistributedError when the job cannot form within the init timeout.
    """
    settings = settings_from_env(os.environ if env is None else env)
    if settings is None or jax.distributed.is_initialized():
        return settings
    where = settings.coordinator_address or f"the {settings.source} coordinator"
    print(
        f"jaxlm: process {settings.process_id} of {settings.num_processes} joining {where} "
        f"({settings.source}; waiting up to {settings.init_timeout_s} s for every process)",
        file=sys.stderr,
        flush=True,
    )
    jax.config.update("jax_enable_preemption_service", True)  # the agreed stop after SIGTERM
    try:
        jax.distributed.initialize(**jax_initialize_kwargs(settings))
    except Exception as e:  # jax raises RuntimeError / XlaRuntimeError with a multi-line status
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"process {settings.process_id} of {settings.num_processes} could not join the job at {where} within "
            f"{settings.init_timeout_s} s ({first}); start every process, check the coordinator's host:port, "
            "or raise JAXLM_INIT_TIMEOUT_S"
        ) from None
    client = coordination_client()
    if client is None:
        print("jaxlm: warning: no coordination client found; a lost peer is reported by jax's own heartbeat "
              f"only (after {settings.heartbeat_timeout_s + _BACKSTOP_S} s)", file=sys.stderr, flush=True)
        return settings
    watch = PeerWatch(client, jax.process_index(), jax.process_count(), settings.heartbeat_timeout_s,
                      LOST_PEER_EXIT_CODE, settings.coordinator_address or "")
    watch.start()
    _watch.append(watch)
    atexit.register(watch.exiting.set)  # runs before jax's own shutdown barrier, which a lost peer would hold
    return settings


def finish() -> None:
    """Mark this process's work as done so peers still running do not report it lost."""
    while _watch:
        _watch.pop().finish()
