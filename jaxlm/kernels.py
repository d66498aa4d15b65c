"""What each attention and projection call of a model runs, and why (``jaxlm kernels CONFIG``).

For a config, lists the calls one transformer layer makes while training (the global batch),
prefilling a prompt and decoding one token (``generate``'s contiguous cache, and the serving
engine's paged cache), and asks :func:`pallas_kernels.table.select` about each for a machine:
a GPU target of :data:`sharding.targets.TARGETS` (its platform and compute capability), ``cpu``,
or this machine's device. Shapes are the unsharded ones; the dispatch selects GEMMs on each
shard's shape, which a mesh can make smaller.
"""

from __future__ import annotations

import dataclasses

from jaxlm.config import Config
from pallas_kernels.table import Call, Selection, select
from sharding.targets import get_target

SERVE_PAGE_SIZE = 16  # the serving engine's default page size (jaxlm.serve.engine.Engine)
SERVE_PREFILL_CHUNK = 64  # `jaxlm serve --prefill-chunk`'s default: prompt tokens one sequence feeds per step


@dataclasses.dataclass(frozen=True)
class KernelCall:
    phase: str  # train | prefill | decode | serve
    call: str  # which call of the layer
    selection: Selection


def machine(target: str | None) -> tuple[str, str | None, str]:
    """``(platform, compute_capability, name)`` for ``--target`` (None: this machine's first device)."""
    if target is None:
        from pallas_kernels.dispatch import device_info

        platform, capability = device_info()
        return platform, capability, f"this machine ({platform}{' sm_' + capability.replace('.', '') if capability else ''})"
    if target.lower() == "cpu":
        return "cpu", None, "cpu"
    spec = get_target(target)
    return "gpu", spec.compute_capability, f"{spec.name} ({spec.device_kind}, sm_{spec.compute_capability.replace('.', '')})"


def model_kernel_calls(cfg: Config, target: str | None = None) -> list[KernelCall]:
    """Every attention/projection call of one layer of ``cfg``'s model, with what runs on ``target``."""
    platform, capability, _ = machine(target)
    m = cfg.model
    dtype = m.compute_dtype
    E, H, K, D, F = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    group = H // K
    train_tokens = cfg.train.batch_size // max(1, cfg.train.grad_accum_steps) * cfg.data.seq_len
    prompt = cfg.data.seq_len
    out = []

    def add(phase, name, op, call, impl):
        out.append(KernelCall(phase, name, select(op, call, impl=impl, platform=platform, capability=capability)))

    def projections(phase, tokens):
        mm = m.matmul_impl
        add(phase, "q projection", "projection", Call(dtype, mnk=(tokens, H * D, E)), mm)
        add(phase, "k/v projection", "projection", Call(dtype, mnk=(tokens, K * D, E)), mm)
        add(phase, "o projection", "projection", Call(dtype, mnk=(tokens, E, H * D)), mm)
        add(phase, "gate/up (SwiGLU)", "swiglu", Call(dtype, mnk=(tokens, F, E)), mm)
        add(phase, "down projection", "projection", Call(dtype, mnk=(tokens, E, F)), mm)

    attn = m.attention_impl
    # documents packed into rows carry segment ids (prepared data); the embedded corpus is one document
    add("train", "attention", "attention",
        Call(dtype, head_dim=D, segment_ids=bool(cfg.data.path), seq_len=cfg.data.seq_len, group=group,
             sequence_sharded=cfg.mesh.sequence > 1), attn)
    projections("train", train_tokens)
    add("prefill", "attention (cache)", "cached_attention",
        Call(dtype, head_dim=D, cache="contiguous", q_len=prompt, group=group), attn)
    add("decode", "attention (cache)", "cached_attention",
        Call(dtype, head_dim=D, cache="contiguous", q_len=1, group=group), attn)
    projections("decode", 1)
    add("serve", "prefill (paged cache)", "cached_attention",
        Call(dtype, head_dim=D, cache="paged", q_len=SERVE_PREFILL_CHUNK, group=group, page_size=SERVE_PAGE_SIZE), attn)
    add("serve", "attention (paged cache)", "cached_attention",
        Call(dtype, head_dim=D, cache="paged", q_len=1, group=group, page_size=SERVE_PAGE_SIZE), attn)
    return out


def format_kernel_calls(cfg: Config, target: str | None = None) -> str:
    """The table ``jaxlm kernels`` prints."""
    _, _, where = machine(target)
    calls = model_kernel_calls(cfg, target)
    m = cfg.model
    lines = [f"kernels on {where}: attention_impl={m.attention_impl} matmul_impl={m.matmul_impl} "
             f"compute_dtype={m.compute_dtype} (shapes unsharded; per layer)"]
    rows = [("phase", "call", "kernel", "blocks", "why")]
    for c in calls:
        why = c.selection.reason.split(": ", 1)[1] if ": " in c.selection.reason else c.selection.reason
        rows.append((c.phase, c.call, c.selection.kernel + (" (substituted)" if c.selection.substituted else ""),
                     c.selection.blocks.describe(), why))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
    return "\n".join(lines)
