"""THE kernel table: per op, the candidate kernels, what each supports, its blocks; :func:`select`.

The model reaches every kernel through :mod:`pallas_kernels.dispatch`, which asks :func:`select`
what runs. ``select`` walks the op's candidates in order and returns the first that the config's
``impl`` allows and that supports the call, as a :class:`Selection` (the kernel, its blocks and
the reason in words). A candidate passed over for a property of the call (dtype, head_dim,
segment ids, shape, cache layout), rather than for the platform, is a substitution: the reason
says which and why, and the dispatch warns with it once. Nothing else chooses a kernel.

=================  =====================================================================================
op                 candidates in order (impls that may pick them) -- support
=================  =====================================================================================
attention          cudnn (auto, cudnn) -- gpu sm_80+, with the GPU present (a compile-only plan cannot
                   build it); bf16/fp16; head_dim a multiple of 8 up to 128; self-attention over one
                   call's tokens, not sequence-sharded; segment ids (as a mask) at an even length
                   flash_mosaic (auto, pallas) -- gpu sm_90; bf16/fp16; head_dim 64; no segment ids
                   flash_triton (auto, pallas) -- gpu sm_80+ (cpu: interpreter, pallas only); bf16/fp16/fp32;
                   head_dim <= 128; segment ids
                   xla (auto, xla) -- everything
cached_attention   decode_triton (auto, pallas) -- as flash_triton; <= 16 new tokens, tokens x group <= 64
                   rows; contiguous cache, or paged with page_size 16/32/64/128 (float32: 16/32) and
                   a power-of-two head_dim >= 16
                   then the attention candidates over the (gathered) cache, cudnn excepted (it cannot
                   mask a cache: ``cudnn`` runs the ``pallas`` candidates here, reported)
projection         matmul_mosaic (pallas) -- gpu sm_90; bf16/fp16; M, N multiples of 64, K of 64
                   matmul_triton (pallas) -- gpu sm_80+ (cpu: interpreter, pallas only); bf16/fp16/fp32
                   xla (auto, xla)
swiglu             swiglu_triton (pallas) -- as matmul_triton
                   xla (auto, xla)
=================  =====================================================================================

``auto`` runs an interpreter never: on CPU it is ``xla``. Other platforms (TPU, ROCm) get ``xla``
under ``auto`` and a one-line ConfigError for ``pallas``/``cudnn``.

Why this order (measured on one H200, jax 0.11.2, ``benchmarks/gpu_acceptance.py``, table in
``benchmarks/RESULTS.md``): cuDNN's attention ran 288-542 TFLOP/s forward+backward where
flash_mosaic ran 110-119 and flash_triton 77-96 (bf16, GQA 4, 2k and 8k tokens), and 185-235
with segment ids against flash_triton's 88-102; XLA's GEMMs (cuBLAS) ran 597-804 TFLOP/s where
matmul_triton ran 591-706 and matmul_mosaic 532-664. A 1B model's training step took 238 ms
with cuDNN attention and XLA GEMMs, 282 ms with flash_mosaic and XLA GEMMs, 377 ms with every
Pallas kernel and 693 ms with XLA alone. The Pallas attention kernels stay ``auto``'s choice for
what cuDNN does not take (float32, KV caches, sequence-sharded keys), and decode_triton for
cached attention: it read the KV cache at 2.8-3.3 TB/s where XLA read 1.1. The Pallas GEMMs run
under ``matmul_impl: pallas`` only.

Blocks. Each candidate's block table is in :data:`BLOCKS` (matmul_triton's is
:data:`pallas_kernels.matmul.BLOCK_TABLE`, which its backward and SwiGLU's also read;
swiglu_triton's :data:`pallas_kernels.matmul.SWIGLU_BLOCK_TABLE`; matmul_mosaic's tiles come
from :func:`pallas_kernels.matmul_mosaic.pick_tiles`). Every row is
compiled for sm_80 and sm_90 by ``tests/test_kernel_resources.py`` (``pallas_kernels.resources``)
and must compile with no spills and within the target's shared memory: a configuration that
fails is not in the table, and the known-bad ones (:func:`known_bad`) are kept as negative
tests of that checker. ``benchmarks/RESULTS.md`` has the measured registers, shared memory and
spills of each. What only a GPU can tell (speed, and numerics of the compiled Mosaic kernels)
is ``benchmarks/kernels.py``'s job.

Why flash_mosaic is limited to head_dim 64: at head_dim 128 its forward spills (ptxas, sm_90a),
so ``select`` gives head_dim 128 to flash_triton.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from sharding.errors import ConfigError

OPS = ("attention", "cached_attention", "projection", "swiglu")
IMPLS = {"attention": ("auto", "xla", "pallas", "cudnn"), "projection": ("auto", "xla", "pallas")}
DECODE_MAX_QUERY_TOKENS = 16  # new tokens per sequence up to which the decode kernel runs
DECODE_MAX_ROWS = 64  # tokens x query heads per kv head in one decode tile (128 spills at head_dim 128)
# paged-cache page sizes the decode kernel is compiled for, per bytes per element (float32: at
# 64-key pages a 64-row tile spills)
PAGE_SIZES = {2: (16, 32, 64, 128), 4: (16, 32)}
_HALF, _FULL = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)), (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Triton flash attention tiles (forward and both backward kernels)."""

    block_q: int
    block_k: int

    def describe(self) -> str:
        return f"block_q={self.block_q} block_k={self.block_k}"


@dataclasses.dataclass(frozen=True)
class MosaicFlashBlocks:
    """Mosaic GPU forward (two compute warpgroups of ``block_q`` rows) + Triton backward tiles."""

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    backward: FlashBlocks = FlashBlocks(64, 64)

    def describe(self) -> str:
        return (f"block_q=2x{self.block_q} block_kv={self.block_kv} stages={self.max_concurrent_steps} "
                f"bwd {self.backward.describe()}")


@dataclasses.dataclass(frozen=True)
class DecodeBlocks:
    block_k: int  # keys per step; the page size when paged
    num_splits: int = 8

    def describe(self) -> str:
        return f"block_k={self.block_k} splits={self.num_splits}"


@dataclasses.dataclass(frozen=True)
class NoBlocks:
    def describe(self) -> str:
        return "-"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One candidate: what it runs on and what calls it takes."""

    name: str
    impls: tuple[str, ...]  # config values that may pick it
    platforms: tuple[str, ...]  # "gpu"; "cpu" means the Pallas interpreter (never under auto)
    capabilities: tuple[int, ...] = ()  # GPU compute capability majors (empty: any)
    min_capability: tuple[int, int] = (8, 0)
    dtypes: tuple = _FULL
    head_dims: tuple[int, int] | None = None  # (min, max) supported head_dim
    segment_ids: bool = True
    cache: tuple[str, ...] = ()  # cache layouts taken (cached_attention's own kernels)
    self_attention_only: bool = False  # cannot mask keys that are not the queries' own tokens
    head_dim_multiple: int = 1
    needs_device: bool = False  # compiles only with the GPU present (not in a compile-only plan)


def _nbytes(dtype) -> int:
    return 2 if jnp.dtype(dtype).itemsize <= 2 else 4


def _flash_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


# Block tables: candidate -> key -> blocks. Keys: attention (head_dim class, bytes per element);
# decode "contiguous" or the page size. Every row compiles clean on sm_80 and sm_90.
BLOCKS: dict[str, Mapping[Any, Any]] = {
    "flash_mosaic": {(64, 2): MosaicFlashBlocks()},
    "flash_triton": {
        (64, 2): FlashBlocks(64, 32),  # 64 x 64: the dq kernel spills on sm_80 (4 warps at head_dim 64)
        (128, 2): FlashBlocks(64, 64),
        (64, 4): FlashBlocks(32, 32),  # 64 x 32: dq and dk/dv spill on sm_80
        (128, 4): FlashBlocks(32, 32),
    },
    "decode_triton": {
        ("contiguous", 2): DecodeBlocks(64),
        ("contiguous", 4): DecodeBlocks(32),  # 64 spills at head_dim 128
        **{(p, n): DecodeBlocks(p) for n, sizes in PAGE_SIZES.items() for p in sizes},
    },
}

KERNELS: dict[str, tuple[Kernel, ...]] = {
    "attention": (
        # jax.nn.dot_product_attention's cuDNN checks (jax/_src/cudnn/fused_attention_stablehlo.py,
        # check_is_flash_attention): head_dim a multiple of 8, <= 128 before Hopper (256 on it)
        Kernel("cudnn", ("auto", "cudnn"), ("gpu",), dtypes=_HALF, head_dims=(8, 128), head_dim_multiple=8,
               self_attention_only=True, needs_device=True),
        Kernel("flash_mosaic", ("auto", "pallas"), ("gpu",), capabilities=(9,), dtypes=_HALF,
               head_dims=(64, 64), segment_ids=False),
        Kernel("flash_triton", ("auto", "pallas"), ("gpu", "cpu"), head_dims=(1, 128)),
        Kernel("xla", ("auto", "xla"), ("gpu", "cpu", "*")),
    ),
    "cached_attention": (
        Kernel("decode_triton", ("auto", "pallas"), ("gpu", "cpu"), head_dims=(1, 128), cache=("contiguous", "paged")),
        Kernel("flash_mosaic", ("auto", "pallas"), ("gpu",), capabilities=(9,), dtypes=_HALF,
               head_dims=(64, 64), segment_ids=False),
        Kernel("flash_triton", ("auto", "pallas"), ("gpu", "cpu"), head_dims=(1, 128)),
        Kernel("xla", ("auto", "xla"), ("gpu", "cpu", "*")),
    ),
    "projection": (
        Kernel("matmul_mosaic", ("pallas",), ("gpu",), capabilities=(9,), dtypes=_HALF),
        Kernel("matmul_triton", ("pallas",), ("gpu", "cpu")),
        Kernel("xla", ("auto", "xla"), ("gpu", "cpu", "*")),
    ),
    "swiglu": (
        Kernel("swiglu_triton", ("pallas",), ("gpu", "cpu")),
        Kernel("xla", ("auto", "xla"), ("gpu", "cpu", "*")),
    ),
}


@dataclasses.dataclass(frozen=True)
class Call:
    """What :func:`select` needs to know about one call (all static at trace time)."""

    dtype: Any
    head_dim: int | None = None
    segment_ids: bool = False
    cache: str | None = None  # None (self-attention over the call's tokens), "contiguous", "paged"
    q_len: int | None = None  # new tokens per sequence (cached attention)
    group: int = 1  # query heads per kv head
    page_size: int | None = None
    seq_len: int | None = None  # tokens per sequence (self-attention); None: unknown
    mnk: tuple[int, int, int] | None = None  # GEMM shape (projection)
    sequence_sharded: bool = False  # context parallelism gathers keys that are not the queries'
    other_keys: bool = False  # keys at other positions than the queries' own (kv_positions is not q_positions)

    def describe(self) -> str:
        parts = [jnp.dtype(self.dtype).name]
        if self.head_dim is not None:
            parts.append(f"head_dim {self.head_dim}")
        if self.segment_ids:
            parts.append("segment ids")
        if self.cache:
            parts.append(f"{self.cache} cache" + (f" (page {self.page_size})" if self.page_size else "")
                         + f", {self.q_len} new token(s), group {self.group}")
        if self.mnk:
            parts.append("M={} N={} K={}".format(*self.mnk))
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Selection:
    """What runs for one call, and why (``reason`` is printed by ``jaxlm kernels`` and warned on
    substitution)."""

    op: str
    kernel: str
    blocks: Any
    reason: str
    substituted: bool  # a candidate the impl prefers was passed over for a property of the call


def _platform_reason(k: Kernel, impl: str, platform: str, capability: tuple[int, int] | None,
                     deviceless: bool = False) -> str | None:
    """Why ``k`` does not run on this machine at all (None: it may)."""
    if platform not in k.platforms and "*" not in k.platforms:
        return f"not on {platform}"
    if deviceless and k.needs_device:
        return "compiles only with the GPU present (cuDNN builds its kernel on the device)"
    if platform == "cpu" and k.name != "xla" and impl == "auto":
        return "auto never runs the CPU interpreter"
    if platform == "gpu" and k.name != "xla":  # XLA runs on every GPU it supports
        if capability is None:
            return "unknown compute capability"
        if k.capabilities and capability[0] not in k.capabilities:
            return f"needs sm_{k.capabilities[0]}0, this is sm_{capability[0]}{capability[1]}"
        if capability < k.min_capability:
            return f"needs sm_{k.min_capability[0]}{k.min_capability[1]}+"
    return None


_ROUTING = "\0"  # marks a reason that is the op's routing (prefill past the decode kernel), not a substitution


def _call_reason(op: str, k: Kernel, call: Call) -> str | None:
    """Why ``k`` cannot take this call (None: it can)."""
    if k.name == "xla":
        return None
    if jnp.dtype(call.dtype) not in k.dtypes:
        return f"dtype {jnp.dtype(call.dtype).name} not supported"
    if k.head_dims and call.head_dim is not None and not k.head_dims[0] <= call.head_dim <= k.head_dims[1]:
        lo, hi = k.head_dims
        return f"head_dim {call.head_dim} not supported ({lo}..{hi})" if lo != hi else f"head_dim {call.head_dim} not supported (only {lo})"
    if call.head_dim is not None and call.head_dim % k.head_dim_multiple:
        return f"head_dim {call.head_dim} not a multiple of {k.head_dim_multiple}"
    if call.segment_ids and not k.segment_ids:
        return "segment ids not supported"
    if k.name == "cudnn" and call.segment_ids and call.seq_len is not None and call.seq_len % 2:
        return f"segment ids (a mask) need an even sequence length, not {call.seq_len}"
    if k.self_attention_only and (call.cache or call.sequence_sharded or call.other_keys):
        return "cannot mask keys other than the queries' own tokens (KV cache or sequence-sharded)"
    if op == "cached_attention" and k.cache:
        if call.cache not in k.cache:
            return f"no {call.cache} cache"
        if call.q_len is None or call.q_len > DECODE_MAX_QUERY_TOKENS:
            return _ROUTING + f"{call.q_len} new tokens > {DECODE_MAX_QUERY_TOKENS}"
        rows = call.q_len * call.group
        if rows > DECODE_MAX_ROWS:
            return f"{call.q_len} tokens x {call.group} heads per kv head = {rows} rows > {DECODE_MAX_ROWS}"
        sizes = PAGE_SIZES[_nbytes(call.dtype)]
        d = call.head_dim
        if call.cache == "paged" and d is not None and (d < 16 or d & (d - 1)):
            # the kernel pads head_dim to a power of two; padding a page pool copies every layer's pages
            return f"paged cache with head_dim {d}: only powers of two >= 16 (padding would copy the whole pool)"
        if call.cache == "paged" and call.page_size not in sizes:
            return f"page_size {call.page_size} not one of {', '.join(map(str, sizes))} for {jnp.dtype(call.dtype).name}"
    if k.name == "matmul_mosaic" and call.mnk:
        from pallas_kernels.matmul_mosaic import unsupported_reason

        reason = unsupported_reason(*call.mnk, call.dtype)
        if reason:
            return reason
    return None


def blocks_for(kernel: str, call: Call):
    """The block table row ``kernel`` uses for ``call``."""
    if kernel in ("flash_triton", "flash_mosaic"):
        return BLOCKS[kernel][(_flash_class(call.head_dim), _nbytes(call.dtype))]
    if kernel == "decode_triton":
        return BLOCKS[kernel][("contiguous" if call.cache == "contiguous" else call.page_size, _nbytes(call.dtype))]
    if kernel == "matmul_triton" and call.mnk:
        from pallas_kernels.matmul import pick_blocks

        return pick_blocks(*call.mnk, call.dtype)
    if kernel == "swiglu_triton" and call.mnk:
        from pallas_kernels.matmul import pick_swiglu_blocks

        return pick_swiglu_blocks(*call.mnk, call.dtype)
    if kernel == "matmul_mosaic" and call.mnk:
        from pallas_kernels.matmul_mosaic import pick_tiles

        return pick_tiles(*call.mnk, call.dtype)
    return NoBlocks()


def _normalise(platform: str) -> str:
    return "gpu" if platform in ("gpu", "cuda") else platform


def select(op: str, call: Call, *, impl: str, platform: str, capability: str | tuple[int, int] | None,
           deviceless: bool = False) -> Selection:
    """The kernel for ``call`` of ``op`` under config value ``impl`` on ``platform``/``capability``.

    ``capability`` is the GPU's compute capability (``"9.0"`` or ``(9, 0)``; ignored elsewhere).
    ``deviceless``: compiling for a GPU that is not here (``jaxlm plan``), where cuDNN's kernel
    cannot be built: ``auto`` then plans the next candidate and ``cudnn`` the ``pallas`` kernels,
    each saying so in the reason (a substitution: the plan compiles another kernel than the GPU runs).
    Raises ConfigError (one line) for an impl that is not available or has no kernel on the platform.
    """
    if op not in KERNELS:
        raise ValueError(f"kernel op '{op}' is not one of {', '.join(KERNELS)}")
    platform = _normalise(platform)
    if isinstance(capability, str):
        capability = tuple(int(x) for x in capability.split(".")[:2])
    allowed = IMPLS["projection" if op in ("projection", "swiglu") else "attention"]
    key = "matmul_impl" if op in ("projection", "swiglu") else "attention_impl"
    if impl not in allowed:
        raise ConfigError(f"{key} '{impl}' is not available; choose one of {', '.join(allowed)}")
    where = platform if platform != "gpu" else f"gpu sm_{capability[0]}{capability[1]}" if capability else "gpu"
    if impl == "cudnn" and platform != "gpu":
        raise ConfigError(f"attention_impl 'cudnn' has no kernel for {where} (cudnn: not on {platform}); use 'xla' or 'auto'")
    effective, note = impl, []
    if impl == "cudnn" and platform == "gpu" and (op == "cached_attention" or call.sequence_sharded):
        effective = "pallas"  # cuDNN's is_causal cannot mask keys that are not the queries' own
        what = "a KV cache" if op == "cached_attention" else "keys gathered over the sequence axis"
        note.append(f"cudnn cannot mask {what}, so the pallas kernels run")
    elif impl == "cudnn" and platform == "gpu" and deviceless:
        effective = "pallas"
        note.append("cudnn compiles only with the GPU present, so this compile-only plan compiles the pallas kernels")
    mine = [k for k in KERNELS[op] if effective in k.impls]
    runnable = [k for k in mine if _platform_reason(k, effective, platform, capability, deviceless) is None]
    if impl == "auto" and deviceless and op == "attention" and any(
            k.needs_device and _call_reason(op, k, call) is None for k in mine
            if _platform_reason(k, effective, platform, capability) is None):
        note.append("cudnn, which the GPU runs for this call, compiles only with the GPU present: "
                    "this compile-only plan compiles the next candidate")
    if not runnable:
        why = _platform_reason(mine[0], effective, platform, capability) if mine else "no kernel"
        raise ConfigError(f"{key} '{impl}' has no kernel for {where} ({mine[0].name if mine else op}: {why}); "
                          "use 'xla' or 'auto'")
    passed = []
    for k in runnable:
        why = _call_reason(op, k, call)
        if why is None:
            substituted = any(not r.startswith(_ROUTING) for _, r in passed) or bool(note)
            passed = [(name, r.lstrip(_ROUTING)) for name, r in passed]
            head = f"{op}: {k.name} ({impl} on {where}; {call.describe()})"
            tail = "; ".join(note + [f"instead of {name}: {reason}" for name, reason in passed])
            return Selection(op, k.name, blocks_for(k.name, call), head + (f"; {tail}" if tail else ""), substituted)
        passed.append((k.name, why))
    # an explicit impl whose kernels all refuse the call: the XLA reference, announced
    detail = "; ".join(note + [f"{name}: {reason.lstrip(_ROUTING)}" for name, reason in passed])
    return Selection(op, "xla", NoBlocks(), f"{op}: xla ({impl} on {where}; {call.describe()}); no {impl} kernel takes it: {detail}", True)


# --------------------------------------------------------------------------------------------
# what the compile test covers


def pickable(target) -> list[dict]:
    """Every block configuration :func:`select` can pick on ``target`` (a GpuTarget), at the
    largest shape of its class, for :mod:`pallas_kernels.resources`: each attention row at the
    head_dim of its class (bf16, one fp16, segment ids at head_dim 128: the most registers),
    forward and backward; each decode row with the most rows a tile holds
    (``DECODE_MAX_ROWS``) at head_dim 128; each GEMM row at a shape of its row class (matmul
    forward and backward, whose kernels read the same table; SwiGLU forward, whose backward is
    the matmul kernel); each Mosaic GEMM tile shape with the deepest pipeline."""
    cap = target.capability
    bf16, fp16, fp32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)

    def on_target(op, name):
        k = next(k for k in KERNELS[op] if k.name == name)
        return _platform_reason(k, "pallas", "gpu", cap) is None

    out = []
    attention = dict(kind="attention", segments=False)
    if on_target("attention", "flash_mosaic"):
        out.append(dict(attention, kernel="flash_mosaic", blocks=BLOCKS["flash_mosaic"][(64, 2)], dtype=bf16, head_dim=64))
    rows = BLOCKS["flash_triton"]
    out += [
        dict(attention, kernel="flash_triton", blocks=rows[(64, 2)], dtype=fp16, head_dim=64),
        dict(attention, kernel="flash_triton", blocks=rows[(128, 2)], dtype=bf16, head_dim=128),
        dict(attention, kernel="flash_triton", blocks=rows[(128, 2)], dtype=bf16, head_dim=128, segments=True),
        dict(attention, kernel="flash_triton", blocks=rows[(64, 4)], dtype=fp32, head_dim=64),
        dict(attention, kernel="flash_triton", blocks=rows[(128, 4)], dtype=fp32, head_dim=128),
    ]
    heads = (4 * DECODE_MAX_ROWS // DECODE_MAX_QUERY_TOKENS, 4)  # 16 tokens x G query heads = DECODE_MAX_ROWS
    for (layout, nbytes), blocks in BLOCKS["decode_triton"].items():
        out.append(dict(kind="decode", kernel="decode_triton", blocks=blocks, dtype=bf16 if nbytes == 2 else fp32,
                        head_dim=128, q_len=DECODE_MAX_QUERY_TOKENS, paged=layout != "contiguous", heads=heads))
    from pallas_kernels.matmul import BLOCK_TABLE, SWIGLU_BLOCK_TABLE

    m_of = {"skinny": 16, "medium": 256, "large": 2048}
    for (cls, nbytes), blocks in BLOCK_TABLE.items():
        dtype = bf16 if nbytes == 2 else fp32
        out.append(dict(kind="projection", kernel="matmul_triton", blocks=blocks, dtype=dtype, mnk=(m_of[cls], 1024, 1024)))
        out.append(dict(kind="swiglu", kernel="swiglu_triton", blocks=SWIGLU_BLOCK_TABLE[(cls, nbytes)], dtype=dtype,
                        mnk=(m_of[cls], 1024, 1024), grad=False))
    if on_target("projection", "matmul_mosaic"):
        from pallas_kernels.matmul_mosaic import pick_tiles

        for M, N in ((512, 512), (512, 64), (64, 512), (64, 64)):
            out.append(dict(kind="projection", kernel="matmul_mosaic", blocks=pick_tiles(M, N, 1024, bf16),
                            dtype=bf16, mnk=(M, N, 1024), grad=False))
    return out


def known_bad(target) -> list[dict]:
    """Configurations that interpret mode and cross-lowering accept but the GPU compiler rejects
    or that spill: the compile test expects its checker to flag each of them."""
    from pallas_kernels.matmul import Blocks

    return [
        # 128 x 512 tiles: 294,912 B of shared memory (H100 allows 232,448)
        dict(kind="attention", kernel="flash_triton", blocks=FlashBlocks(128, 512), dtype=jnp.bfloat16, head_dim=128),
        # 256 x 128 tiles: compiles, spills
        dict(kind="attention", kernel="flash_triton", blocks=FlashBlocks(256, 128), dtype=jnp.bfloat16, head_dim=128),
        # 256 x 256 x 256, 3 stages: 786,432 B of shared memory
        dict(kind="projection", kernel="matmul_triton", blocks=Blocks(256, 256, 256, num_warps=8, num_stages=3),
             dtype=jnp.bfloat16, mnk=(2048, 1024, 1024)),
    ]


# --------------------------------------------------------------------------------------------
# running a selected kernel (the dispatch and the compile test call these)


def run_attention(kernel: str, blocks, q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *, interpret: bool):
    """A flash candidate with explicit blocks; ``kv_seg`` defaults to ``q_seg`` (self-attention)."""
    if kernel == "flash_mosaic":
        from pallas_kernels.flash_attention_mosaic import flash_attention_mosaic

        assert q_seg is None, "flash_mosaic takes no segment ids (select() never picks it for them)"
        return flash_attention_mosaic(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos,
                                      block_kv=blocks.block_kv, interpret=interpret or None)
    from pallas_kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos, q_segment_ids_BxT=q_seg,
                           kv_segment_ids_BxS=q_seg if kv_seg is None else kv_seg, block_q=blocks.block_q,
                           block_k=blocks.block_k, interpret=interpret)


def run_decode(kernel: str, blocks: DecodeBlocks, q, k_cache, v_cache, lengths, page_table=None, *, interpret: bool):
    from pallas_kernels.decode_attention import decode_attention

    assert kernel == "decode_triton"
    return decode_attention(q, k_cache, v_cache, lengths, page_table_BxP=page_table, block_k=blocks.block_k,
                            num_splits=blocks.num_splits, interpret=interpret)


def run_matmul(kernel: str, blocks, a, b, *, interpret: bool):
    if kernel == "matmul_mosaic":
        from pallas_kernels.matmul_mosaic import matmul

        return matmul(a, b)
    from pallas_kernels.matmul import matmul

    return matmul(a, b, block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k,
                  num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)


def run_swiglu(kernel: str, blocks, x, w_gate, w_up, *, interpret: bool):
    from pallas_kernels.matmul import swiglu

    assert kernel == "swiglu_triton"
    return swiglu(x, w_gate, w_up, block_m=blocks.block_m, block_n=blocks.block_n, block_k=blocks.block_k,
                  num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)
