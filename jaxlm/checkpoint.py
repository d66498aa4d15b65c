"""Orbax checkpoints: where a run's state is written and read back, onto any mesh.

A checkpoint at step ``N`` holds three items:

* ``params``    - the model parameters (``nnx.State``), float32 master weights;
* ``opt_state`` - the optax state (moments, counters);
* ``meta``      - JSON: the step, the data position (batches consumed), the full run config and
  a checksum of each array tree, checked on restore (a garbled file fails loudly, not silently).

Saves are asynchronous and atomic (a save cut short is left as ``N.orbax-checkpoint-tmp`` and
ignored on restore); old steps are deleted only after a newer save has committed, so the keep
policy never removes the last good checkpoint. A step found unreadable can be set aside as
``N.corrupt`` (:meth:`Checkpointer.quarantine`), which the step listing ignores. Restoring takes
an abstract target whose shardings describe the *current* mesh, so a checkpoint written on one
layout loads onto another.
"""

from __future__ import annotations

import os
import pathlib
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlm.config import CheckpointConfig, Config, ConfigError, config_from_dict
from jaxlm.errors import CheckpointError


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 []: sum over elements of (bit pattern * (2 * flat index + 1)), wrapping mod 2**32.

    Integer sums are exact in any order, so the value is the same on every mesh layout.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}")).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for dim in range(x.ndim):
        index = index * jnp.uint32(x.shape[dim]) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim)
    return jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


RUN_LOGS = ("metrics.jsonl", "tensorboard")  # written beside the checkpoints by jaxlm.train


@jax.jit
def _tree_checksums(tree: Any) -> list[jax.Array]:
    return [_leaf_checksum(x) for x in jax.tree.leaves(tree)]


def tree_checksum(tree: Any) -> int:
    """One integer fingerprint of every array in ``tree`` (values, dtypes' bits and positions)."""
    sums = np.asarray(jax.device_get(_tree_checksums(tree)), dtype=np.uint64)
    weights = np.arange(1, len(sums) + 1, dtype=np.uint64) * np.uint64(0x9E3779B1)
    return int(np.sum(sums * weights, dtype=np.uint64) % np.uint64(2**61 - 1))


class Checkpointer:
    """A thin owner of one ``ocp.CheckpointManager`` over ``directory``."""

    def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig = CheckpointConfig(), *, create: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        if not create and not self.directory.is_dir():
            what = "is a file, not a run directory" if self.directory.exists() else "does not exist"
            raise ConfigError(f"checkpoint directory '{self.directory}' {what}; pass the checkpoint.dir of a "
                              "`jaxlm train` run or of `jaxlm convert`")
        if create:
            _check_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=create,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step of the asynchronous save in flight

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (torn ``*.orbax-checkpoint-tmp`` saves are not listed)."""
        return sorted(self.manager.all_steps())

    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        data_position: int,
        config: Config,
        extra_meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Start writing step ``step`` (returns once the arrays are copied off the devices).

        ``extra_meta`` (JSON-able) is stored beside the step, data position and config.
        ``opt_state=None`` writes a params-only checkpoint (an imported model) that serves
        ``restore`` and ``generate`` but cannot resume training.
        """
        meta = {"step": step, "data_position": data_position, "config": config.to_dict(), **(extra_meta or {})}
        meta["checksums"] = {"params": tree_checksum(params)}
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            meta["checksums"]["opt_state"] = tree_checksum(opt_state)
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._saving = step
        except Exception as e:  # noqa: BLE001 - this save or the previous asynchronous one failed to write
            raise self._write_error(e) from e

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._step_or_latest(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - any failure to read means this step is unusable
            raise CheckpointError(f"checkpoint step {step} in '{self.directory}' cannot be read: {_first_line(e)}") from e
        if not isinstance(meta, dict) or "config" not in meta:
            raise CheckpointError(f"checkpoint step {step} in '{self.directory}' cannot be read: incomplete metadata")
        return meta

    def read_config(self, step: int | None = None) -> Config:
        return config_from_dict(self.read_meta(step)["config"])

    def restore(
        self,
        abstract_params: Any,
        param_shardings: Any,
        abstract_opt_state: Any = None,
        opt_shardings: Any = None,
        step: int | None = None,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """(params, opt_state or None, meta), placed with the given shardings."""
        step = self._step_or_latest(step)
        items = {
            "params": ocp.args.StandardRestore(_abstract(abstract_params, param_shardings)),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(abstract_opt_state, opt_shardings))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - missing, truncated or garbled files all land here
            raise CheckpointError(f"checkpoint step {step} in '{self.directory}' cannot be restored: {_first_line(e)}") from e
        saved = out["meta"].get("checksums", {})
        for name in ("params", "opt_state"):
            if name in out and name in saved and tree_checksum(out[name]) != saved[name]:
                raise CheckpointError(
                    f"checkpoint step {step} in '{self.directory}' cannot be restored: its {name} do not match "
                    "the checksum written with them (a file was corrupted)"
                )
        return out["params"], out.get("opt_state"), out["meta"]

    def quarantine(self, step: int) -> pathlib.Path:
        """Rename an unreadable step ``N`` to ``N.corrupt`` (kept for inspection, no longer listed)."""
        self.manager.wait_until_finished()
        target = self.directory / f"{step}.corrupt"
        n = 1
        while target.exists():
            target, n = self.directory / f"{step}.corrupt{n}", n + 1
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def set_aside(self, prefix: str) -> pathlib.Path:
        """Move the run (every step, committed or torn, and its metrics logs) into a new
        ``<prefix>-<time>`` folder; nothing is deleted. Earlier set-aside folders stay where they are."""
        self.manager.wait_until_finished()
        target = self.directory / f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}"
        n = 1
        while target.exists():
            target, n = self.directory / f"{prefix}-{time.strftime('%Y%m%dT%H%M%S')}-{n}", n + 1
        target.mkdir()
        for p in self.directory.iterdir():
            if p.name.split(".")[0].isdigit() or p.name in RUN_LOGS:
                p.rename(target / p.name)
        self.manager.reload()
        return target

    def _step_or_latest(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ConfigError(f"no checkpoint found in '{self.directory}'; train first or point to a run directory")
        elif step not in self.manager.all_steps():
            raise ConfigError(f"checkpoint step {step} not found in '{self.directory}'; have {sorted(self.manager.all_steps())}")
        return step

    def wait(self) -> None:
        """Block until the asynchronous save in flight has committed; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - the save in flight failed to write (disk full, read-only)
            raise self._write_error(e) from e
        self._saving = None

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(e) from e

    def _write_error(self, e: BaseException) -> CheckpointError:
        try:
            self.manager.reload()
            kept = sorted(self.manager.all_steps())
        except Exception:  # noqa: BLE001 - listing is best effort here
            kept = []
        what = f"kept checkpoints: steps {', '.join(map(str, kept))}" if kept else "no earlier checkpoint exists"
        step = "" if self._saving is None else f" step {self._saving}"
        return CheckpointError(
            f"could not write checkpoint{step} to '{self.directory}' ({_os_reason(e)}); {what} (a rerun "
            "resumes from the newest); free disk space or make the directory writable, then run again"
        )


def _os_reason(e: BaseException) -> str:
    """The operating system's reason in a write error (``File too large (errno 27)``), else its first line."""
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.strerror:
            return f"{x.strerror} (errno {x.errno})"
    text = str(e)
    m = re.search(r"([A-Z][A-Za-z ,']+) \[os_error_code='(\d+)'\]", text)
    if m:
        return f"{m.group(1)} (errno {m.group(2)})"
    return _first_line(e)[:200]


def _check_writable(directory: pathlib.Path) -> None:
    """ConfigError when ``directory`` (or a parent) is a file; CheckpointError when it cannot be written."""
    for parent in (directory, *directory.parents):
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"checkpoint.dir '{directory}': '{parent}' is a file, not a directory; "
                              "choose another checkpoint.dir")
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to checkpoint directory '{directory}': {e.strerror or e}; "
                              "make it writable or choose another checkpoint.dir (nothing was changed)") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].split(" See full TensorStore details")[0] if text else type(e).__name__


def restore(
    directory: str | pathlib.Path,
    mesh: Any = None,
    step: int | None = None,
    log: Callable[[str], None] = print,
):
    """Load a trained model from a run directory onto ``mesh``. Returns ``(model, config)``.

    Without ``step``, the newest step that restores: an unreadable newer one (corrupt, truncated)
    is reported through ``log`` in one line and left in place. With ``step``, that step or
    CheckpointError. Without a mesh, uses the run's own mesh layout when it fits the devices
    present, otherwise FSDP over all devices. A sequence (context-parallel) axis is folded into
    FSDP: decoding feeds one token at a time, which cannot be split along the sequence.
    Raises ConfigError when the directory or step does not exist, CheckpointError when nothing
    in it can be restored.
    """
    ckpt = Checkpointer(directory, create=False)
    try:
        steps = [ckpt._step_or_latest(step)] if step is not None else sorted(ckpt.all_steps(), reverse=True)
        if not steps:
            ckpt._step_or_latest(None)  # raises: no checkpoint found
        bad: list[tuple[int, CheckpointError]] = []
        for s in steps:
            try:
                restored = _restore_step(ckpt, s, mesh)
            except CheckpointError as e:
                if step is not None:
                    raise
                bad.append((s, e))
                continue
            if bad:
                unreadable = ", ".join(str(b) for b, _ in bad)
                log(f"warning: {bad[0][1]}; using step {s}, the newest readable one (unreadable: {unreadable})")
            return restored
        raise CheckpointError(f"no checkpoint in '{ckpt.directory}' can be restored ({bad[0][1]})")
    finally:
        ckpt.close()


def _restore_step(ckpt: Checkpointer, step: int, mesh: Any):
    import dataclasses

    from flax import nnx

    from jaxlm.build import abstract_model, state_shardings
    from jaxlm.config import MeshConfig
    from jaxlm.data import tokenizer_changed
    from sharding.mesh import make_mesh

    meta = ckpt.read_meta(step)
    cfg = config_from_dict(meta["config"])
    changed = tokenizer_changed(meta.get("tokenizer_sha256"), cfg.data.tokenizer_path, cfg.data.tokenizer_path)
    if changed:  # its token ids would decode to other text
        raise ConfigError(f"the run in '{ckpt.directory}' cannot be used: {changed[0]}; {changed[1]}")
    if mesh is None:
        try:
            run_mesh = cfg.mesh
            if run_mesh.sequence != 1:
                run_mesh = dataclasses.replace(run_mesh, fsdp=-1, sequence=1)
            mesh = make_mesh(run_mesh)
        except ConfigError:
            mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    if cfg.train.lora.rank > 0:  # base + adapters, merged at load
        from jaxlm.lora import restore_lora

        return restore_lora(ckpt, step, cfg, mesh), cfg
    graphdef, abstract = abstract_model(cfg.model)
    params, _, _ = ckpt.restore(abstract, state_shardings(abstract, mesh), step=step)
    return nnx.merge(graphdef, params), cfg
