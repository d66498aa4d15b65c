"""Training metrics: model FLOPs and MFU, device memory, and where they are written.

MFU is model FLOPs (from the config, :func:`model_flops_per_token`) per second over the peak dense
FLOP/s of the devices in use (:data:`sharding.targets.PEAK_FLOPS`, looked up from ``device_kind``).
Devices not in the table (CPUs, unknown accelerators) report no MFU rather than a made-up one.

:class:`MetricsLog` writes one JSON object per step to ``metrics.jsonl`` and the same scalars
to TensorBoard event files, from process 0 only.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import jax

from jaxlm.config import LoRAConfig, ModelConfig, lora_projections
from sharding.targets import PEAK_FLOPS  # the one table of GPU targets (peaks with sources)


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device of ``device_kind`` for matmuls in ``dtype`` (None: unknown)."""
    for name, peaks in PEAK_FLOPS.items():  # H200 before H100: "NVIDIA H200" contains neither twice
        if name in device_kind.upper():
            return peaks.get(dtype)
    return None


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding table) of the model ``cfg`` describes."""
    E, L, H, K, D, F, V = (cfg.embed_dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.mlp_dim, cfg.vocab_size)
    attn = E * H * D + 2 * E * K * D + H * D * E + (H * D + 2 * K * D if cfg.qkv_bias else 0)
    block = attn + 3 * E * F + 2 * E
    body = L * block + E + (0 if cfg.tie_embeddings else E * V)
    return body + V * E, body


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N`` for the matmuls (N without the embedding lookup, with the
    output head) plus ``12 L H D T / 2`` for causal attention scores and values (forward + backward)."""
    _, body = count_params(cfg)
    head = 0 if not cfg.tie_embeddings else cfg.embed_dim * cfg.vocab_size  # tied head still multiplies
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len / 2
    return 6 * (body + head) + attention


def device_memory_in_use() -> int | None:
    """Bytes in use on the first local device, where the backend reports it (not on CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("bytes_in_use", 0))


def memory_capacity(devices: list[jax.Device]) -> int:
    """Bytes the ``devices`` can hold together: their ``bytes_limit`` where the backend reports it,
    else (CPU devices, which share the host's memory) the host's physical memory, once per process.

    Only this process's devices report statistics; the others (a multi-process mesh) are taken to
    hold as much each as the local ones on average."""
    local = [d for d in devices if d.process_index == jax.process_index()] or devices[:0]
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
    if local and all(limits):
        return int(sum(limits) * len(devices) / len(local))
    processes = len({d.process_index for d in devices}) or 1
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * processes


def count_lora_params(cfg: ModelConfig, lora: LoRAConfig) -> int:
    """Adapter parameters of a LoRA run: ``rank * (in + out)`` (``A [in, rank]``, ``B [rank, out]``) per
    targeted projection per layer; 0 without LoRA."""
    if not lora.rank:
        return 0
    shapes = lora_projections(cfg)
    return cfg.num_layers * lora.rank * sum(sum(shapes[t]) for t in lora.targets)


def training_bytes(cfg: ModelConfig, microbatch: int, seq_len: int, lora: LoRAConfig | None = None) -> int:
    """A lower bound on the bytes one training step holds: parameters, gradients and two float32
    optimizer moments per parameter, plus the float32 logits of one microbatch and their gradient.

    With LoRA (``lora.rank > 0``) only the float32 adapters have gradients and moments (16 bytes each);
    the frozen base holds its parameters alone, in ``lora.base_dtype``."""
    n_params, _ = count_params(cfg)
    logits = 2 * 4 * microbatch * seq_len * cfg.vocab_size
    if lora is not None and lora.rank:
        base_bytes = 2 if (lora.base_dtype or cfg.param_dtype) == "bfloat16" else 4
        return n_params * base_bytes + count_lora_params(cfg, lora) * 16 + logits
    param_bytes = 2 if cfg.param_dtype == "bfloat16" else 4
    return n_params * (2 * param_bytes + 8) + logits


class MetricsLog:
    """Per-step scalars to ``DIR/metrics.jsonl`` and TensorBoard event files in ``DIR/tensorboard``.

    A no-op unless ``directory`` is set and this is process 0. ``start_step`` is the step the run
    starts from (the restored checkpoint's, 0 for a fresh run): lines of later steps, written by
    an earlier run that was killed before its next checkpoint, are dropped, and TensorBoard hides
    their events (``purge_step``), so after any number of kills and resumes the log holds exactly
    one line per step. :meth:`commit` flushes and fsyncs both; call it whenever a checkpoint is saved.
    """

    def __init__(self, directory: str | pathlib.Path | None, start_step: int = 0):
        self.enabled = bool(directory) and jax.process_index() == 0
        self._jsonl = self._tb = None
        if self.enabled:
            path = pathlib.Path(directory)
            path.mkdir(parents=True, exist_ok=True)
            self._path = path / "metrics.jsonl"
            truncate_after(self._path, start_step)
            self._jsonl = open(self._path, "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(path / "tensorboard"), flush_secs=10, purge_step=start_step + 1)

    def write(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        for name, value in scalars.items():
            self._tb.add_scalar(f"train/{name}", value, step)

    def commit(self) -> None:
        """Flush both logs to the file system and fsync them (what is logged so far survives a kill)."""
        if not self.enabled:
            return
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        self._tb.flush()
        for events in (self._path.parent / "tensorboard").glob("events.out.tfevents.*"):
            fd = os.open(events, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def truncate_after(path: pathlib.Path, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` whose step is past ``step`` (and a torn last line).

    The file is rewritten under a temporary name and renamed over the old one, so a kill during
    the rewrite leaves either file whole.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            if line.endswith("\n") and int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
