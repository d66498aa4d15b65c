"""Flash-attention forward for Hopper (sm_90) in Pallas Mosaic GPU; backward by the Triton kernels.

Same contract as :func:`pallas_kernels.reference.attention_reference` minus segment ids:
grouped-query attention masked by positions (query ``t`` sees key ``s`` iff
``kv_pos[s] <= q_pos[t]``), layout ``[batch, seq, heads, head_dim]``, kv head ``h // G`` read in
place (K/V are never repeated).

What the kernel supports (:mod:`pallas_kernels.table` gives anything else to the Triton kernel):
  * dtypes bfloat16 and float16 (the shared-memory tiles take the input dtype);
  * head_dim 64 or 128;
  * any sequence lengths: the wrapper pads queries to a multiple of ``2 * block_q`` with position
    ``int32.min`` (they see nothing) and keys to a multiple of ``block_kv`` with position
    ``int32.max`` (nobody sees them), then slices the result back;
  * masking by arbitrary positions, elementwise on every visited tile (so prefill, cached
    decoding and any position layout are exact; non-causal attention is positions that make
    every key visible), and tile skipping: a (query block, key block) tile whose smallest key
    position exceeds the block's largest query position skips both matmuls. With sorted
    positions (causal training) that is the upper triangle, about half the work. K/V tiles are
    still streamed (TMA) for skipped tiles; only the tensor-core work is saved.
  * no segment ids.

Kernel shape: one CTA per (query head, pair of query blocks, batch) with three warpgroups: two
compute warpgroups, each owning ``block_q`` = 64 queries (wgmma ``Q K^T`` and ``P V`` from
swizzled shared memory, online softmax in float32 registers with base-2 exponentials), and one
memory warpgroup that streams K^T, V and key positions through a ``max_concurrent_steps``-deep
ring of shared-memory slots with TMA, guarded by "loaded" and "consumed" barriers (it also
waits out the last releases, so no barrier phase goes unobserved). Three choices keep the
kernel inside what the Mosaic GPU interpreter can execute, so the very code that lowers is the
code whose numerics are tested: K is transposed once in HBM (``[B, K, D, S]``) so the ``Q K^T``
wgmma reads an untransposed operand; ``P`` goes through shared memory (the interpreter's wgmma
takes its A operand from shared memory only); each ``P V`` product lands in a fresh accumulator
that is added to the rescaled running sum in registers (the interpreter has no ``run_state``).
FA3-style refinements (P kept in registers, accumulator reuse, a schedule barrier between the
compute warpgroups, unmasked fast path for fully visible tiles) are left for tuning on hardware.

Outputs: O in q's dtype and the natural-log log-sum-exp ``[batch, heads, q_len]`` float32 --
exactly what :func:`pallas_kernels.flash_attention._backward` consumes, so the custom VJP pairs
this forward with the Triton dq and dk/dv kernels (probabilities recomputed from the LSE).
A query row that sees no key gives zeros, as in the Triton kernel.

Verification (no GPU needed; ``tests/test_flash_attention_mosaic.py``):
  * numerics: the Pallas Mosaic GPU interpreter (``interpret=InterpretGPUParams()``; jax >= 0.10) runs the
    kernel on CPU, simulating the warpgroups as threads, shared memory, TMA copies, barriers and
    wgmma; it matches :func:`pallas_kernels.reference.attention_reference` for bf16 with
    head_dim 64 and GQA (forward and the mixed Mosaic-forward/Triton-backward gradients) and for
    fp16 with head_dim 128 (forward), with padding, offset positions and tile skipping.
    Layout casts are lowering hints the interpreter has no use for and are skipped there.
    The interpreter does not model register layouts, asynchronous wgmma completion or timing;
  * lowering: every configuration the dispatcher can pick (bf16/fp16 x head_dim 64/128, GQA,
    training and decode shapes), forward and gradient, lowers for an abstract H100 to a
    ``mosaic_gpu_v2`` custom call (the Mosaic compiler runs, shared-memory budget included).
Runs on real Hopper hardware are for ``benchmarks/kernels.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import _backward as _triton_backward
from pallas_kernels.flash_attention import _Config as _TritonConfig
from pallas_kernels.flash_attention import _pad_axis

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
_COMPUTE_WGS = 2
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# ``plgpu.load(ref, idx, ...)``: jax 0.10 requires the index, jax 0.11 deprecates it and jax 0.12
# removes it (one indexes the ref itself). This kernel loads whole refs: an empty index where the
# argument is required, none otherwise.
_LOAD_IDX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_INDEX = ((),) if _LOAD_IDX is not None and _LOAD_IDX.default is inspect.Parameter.empty else ()


def unsupported_reason(dtype, head_dim: int, has_segments: bool) -> str | None:
    """Why the Mosaic forward cannot serve these inputs, or ``None`` when it can."""
    if has_segments:
        return "segment ids are not supported"
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} is not bfloat16/float16"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} is not 64 or 128"
    return None


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Static kernel parameters (hashable: a ``nondiff_argnums`` argument of the custom VJP)."""

    sm_scale: float
    block_q: int = 64  # per compute warpgroup (wgmma M = 64)
    block_kv: int = 128
    max_concurrent_steps: int = 2
    interpret: Any = None  # None: compile for the GPU; else the Mosaic GPU interpreter's parameters


def _forward_kernel(q_ref, kt_ref, v_ref, qpos_ref, kvpos_ref, qmax_ref, kvmin_ref, o_ref, lse_ref,
                    scratch, barriers, *, cfg: MosaicConfig, group: int, num_kv_steps: int):
    qo_smem2, kt_smem, v_smem, p_smem2, qpos_smem2, kvpos_smem, lse_smem2 = scratch
    q_bars, qpos_bars, k_bars, v_bars, kvpos_bars, k_free, v_free = barriers
    bq, bk = cfg.block_q, cfg.block_kv
    steps = min(cfg.max_concurrent_steps, num_kv_steps)
    batch = lax.axis_index("batch")
    q_head = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    head_dim = q_ref.shape[-1]
    dtype = q_ref.dtype

    def cast(x, layout):  # a lowering hint; the interpreter has no layouts
        return x if cfg.interpret is not None else plgpu.layout_cast(x, layout)

    def load(ref, layout):
        return ref[...] if cfg.interpret is not None else plgpu.load(ref, *_LOAD_INDEX, layout=layout, optimized=False)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo_smem, p_smem = qo_smem2.at[wg], p_smem2.at[wg]
        qpos_smem, lse_smem = qpos_smem2.at[wg], lse_smem2.at[wg]
        q_block = lax.axis_index("q_seq") * _COMPUTE_WGS + wg
        q_base = q_block * bq
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_base, bq), q_head], qo_smem, q_bars.at[wg])
        plgpu.copy_gmem_to_smem(qpos_ref.at[batch, pl.ds(q_base, bq)], qpos_smem, qpos_bars.at[wg])
        plgpu.barrier_wait(q_bars.at[wg])
        plgpu.barrier_wait(qpos_bars.at[wg])
        q_pos = load(qpos_smem, plgpu.Layout.WGMMA.reduce(1))
        q_pos_BQxBK = lax.broadcast_in_dim(q_pos, (bq, bk), [0])
        q_max = qmax_ref[batch, q_block]
        scale = jnp.float32(cfg.sm_scale * _LOG2E)  # logits in base-2 units

        def step(j, carry):
            slot = lax.rem(j, jnp.int32(steps))
            plgpu.barrier_wait(k_bars.at[slot])
            plgpu.barrier_wait(kvpos_bars.at[slot])
            plgpu.barrier_wait(v_bars.at[slot])

            def update(carry):
                acc, m_prev, l_prev = carry

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, kt_smem.at[slot])
                    return acc_ref[...]

                s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32)) * scale
                kv_pos = load(kvpos_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
                mask = lax.broadcast_in_dim(kv_pos, (bq, bk), [1]) <= q_pos_BQxBK
                s = jnp.where(mask, s, _MASK_VALUE)
                m_next = jnp.maximum(m_prev, s.max(axis=1))
                alpha = jnp.exp2(m_prev - m_next)
                p = jnp.where(mask, jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0])), 0.0)
                l_next = l_prev * alpha + p.sum(axis=1)

                p_smem[...] = p.astype(dtype)  # P through shared memory (see the module notes)
                plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                    return acc_ref[...]

                # a fresh accumulator (the interpreter has no run_state), rescaled sum in registers
                pv_BQxD = pl.run_scoped(pv, plgpu.ACC((bq, head_dim), jnp.float32))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv_BQxD
                return acc, m_next, l_next

            visible = kvmin_ref[batch, j] <= q_max  # some pair of this tile may attend
            carry = lax.cond(visible, update, lambda c: c, carry)
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            return carry

        acc = cast(jnp.zeros((bq, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        m = cast(jnp.full((bq,), _MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc, m, l = lax.fori_loop(0, num_kv_steps, step, (acc, m, l))
        l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that saw no key: output 0, not 0/0
        acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        lse_smem[...] = (m + jnp.log2(l_safe)) * jnp.float32(_LN2)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[batch, pl.ds(q_base, bq), q_head])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, q_head, pl.ds(q_base, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(q_head, jnp.int32(group))

        def fetch(j, slot):
            rows = pl.ds(j * bk, bk)
            plgpu.copy_gmem_to_smem(kt_ref.at[batch, kv_head, :, rows], kt_smem.at[slot], k_bars.at[slot])
            plgpu.copy_gmem_to_smem(kvpos_ref.at[batch, rows], kvpos_smem.at[slot], kvpos_bars.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[slot], v_bars.at[slot])

        for j in range(steps):  # fill the ring
            fetch(j, j)

        @pl.loop(steps, num_kv_steps)
        def _refill(j):
            slot = lax.rem(j, jnp.int32(steps))
            plgpu.barrier_wait(k_free.at[slot])  # both compute warpgroups are done with the slot
            plgpu.barrier_wait(v_free.at[slot])
            fetch(j, slot)

        @pl.loop(num_kv_steps, num_kv_steps + steps)
        def _drain(j):  # observe the last releases too, so no barrier phase goes unseen
            slot = lax.rem(j, jnp.int32(steps))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def _forward(cfg: MosaicConfig, q, k, v, q_pos, kv_pos):
    """Padded operands in, ``(o [B,T,H,D], lse [B,H,T] float32)`` out."""
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    bq, bk = cfg.block_q, cfg.block_kv
    num_kv_steps = S // bk
    steps = min(cfg.max_concurrent_steps, num_kv_steps)
    # per-block position bounds for tile skipping (tiny: [B, T/bq] and [B, S/bk])
    q_max = q_pos.reshape(B, T // bq, bq).max(axis=-1)
    kv_min = kv_pos.reshape(B, num_kv_steps, bk).min(axis=-1)
    swizzle = 128  # bytes: one 64-element row of 16-bit values
    tiles = (plgpu.TilingTransform((8, swizzle // q.dtype.itemsize)), plgpu.SwizzleTransform(swizzle))
    scratch = (
        plgpu.SMEM((_COMPUTE_WGS, bq, D), q.dtype, transforms=tiles),
        plgpu.SMEM((steps, D, bk), q.dtype, transforms=tiles),  # K^T tiles
        plgpu.SMEM((steps, bk, D), q.dtype, transforms=tiles),
        plgpu.SMEM((_COMPUTE_WGS, bq, bk), q.dtype, transforms=tiles),  # P
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.int32),
        plgpu.SMEM((steps, bk), jnp.int32),
        plgpu.SMEM((_COMPUTE_WGS, bq), jnp.float32),
    )
    barriers = (
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # q loaded
        plgpu.Barrier(num_barriers=_COMPUTE_WGS),  # q positions loaded
        plgpu.Barrier(num_barriers=steps),  # k loaded
        plgpu.Barrier(num_barriers=steps),  # v loaded
        plgpu.Barrier(num_barriers=steps),  # kv positions loaded
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=steps),  # k slot free
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=steps),  # v slot free
    )
    # K^T in HBM ([B, K, D, S], one transposing pass over K) so that the Q K^T wgmma reads its
    # B operand untransposed; the backward keeps the original K.
    kt = k.transpose(0, 2, 3, 1)
    kernel = functools.partial(_forward_kernel, cfg=cfg, group=H // K, num_kv_steps=num_kv_steps)

    def entry(*refs):
        pl.run_scoped(lambda *scoped: kernel(*refs, scoped[:7], scoped[7:]),
                      *scratch, *barriers, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
        grid=(H, T // (_COMPUTE_WGS * bq), B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=cfg.interpret if cfg.interpret is not None else False,
    )(q, kt, v, q_pos, kv_pos, q_max, kv_min)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_pos, kv_pos, cfg):
    return _forward(cfg, q, k, v, q_pos, kv_pos)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, cfg):
    o, lse = _forward(cfg, q, k, v, q_pos, kv_pos)
    return o, (q, k, v, q_pos, kv_pos, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_pos, kv_pos, o, lse = res
    # Padded keys carry position int32.max, so no index mask is needed (kv_len = padded S).
    tcfg = _TritonConfig(sm_scale=cfg.sm_scale, block_q=cfg.block_q, block_k=64,
                         kv_len=k.shape[1], interpret=cfg.interpret is not None)
    dq, dk, dv = _triton_backward(tcfg, q, k, v, q_pos, kv_pos, None, None, o, lse, do)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_kv", "interpret"))
def flash_attention_mosaic(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    q_positions_BxT: jax.Array,
    kv_positions_BxS: jax.Array,
    sm_scale: float | None = None,
    block_kv: int = 128,
    interpret: Any = None,
) -> jax.Array:
    """Mosaic GPU forward + Triton backward; ``[batch, q_len, heads, head_dim]`` in q's dtype.

    Inputs must satisfy :func:`unsupported_reason` (bf16/fp16, head_dim 64/128, no segments);
    ValueError otherwise (the kernel table selects another kernel for them). ``interpret``: None
    compiles for the GPU; the Mosaic GPU interpreter's parameters (``InterpretGPUParams``, which
    jax does not export publicly, so the caller builds it) run the forward in that interpreter
    and the backward in the Pallas interpreter.
    """
    B, T, H, D = q_BxTxHxD.shape
    _, S, K, _ = k_BxSxKxD.shape
    reason = unsupported_reason(q_BxTxHxD.dtype, D, has_segments=False)
    if reason:
        raise ValueError(f"flash_attention_mosaic: {reason}; use pallas_kernels.flash_attention.flash_attention")
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if k_BxSxKxD.shape != v_BxSxKxD.shape or not (q_BxTxHxD.dtype == k_BxSxKxD.dtype == v_BxSxKxD.dtype):
        raise ValueError(f"k {k_BxSxKxD.shape} and v {v_BxSxKxD.shape} must match and share q's dtype")
    cfg = MosaicConfig(sm_scale=D**-0.5 if sm_scale is None else float(sm_scale), block_kv=block_kv,
                       interpret=interpret)
    Tp = pl.cdiv(T, _COMPUTE_WGS * cfg.block_q) * _COMPUTE_WGS * cfg.block_q
    Sp = pl.cdiv(S, block_kv) * block_kv
    i32 = jnp.iinfo(jnp.int32)
    q = _pad_axis(q_BxTxHxD, 1, Tp)
    k = _pad_axis(k_BxSxKxD, 1, Sp)
    v = _pad_axis(v_BxSxKxD, 1, Sp)
    q_pos = _pad_axis(q_positions_BxT.astype(jnp.int32), 1, Tp, i32.min)
    kv_pos = _pad_axis(kv_positions_BxS.astype(jnp.int32), 1, Sp, i32.max)
    return _flash(q, k, v, q_pos, kv_pos, cfg)[:, :T]
