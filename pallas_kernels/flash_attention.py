"""Flash attention for GPUs: Pallas kernels lowered through Triton, with a blockwise backward.

Same contract as :func:`pallas_kernels.reference.attention_reference`: grouped-query attention
masked by positions (query ``t`` sees key ``s`` iff ``kv_pos[s] <= q_pos[t]``) and, optionally,
by segment ids. Layout stays ``[batch, seq, heads, head_dim]`` end to end; the kv head of query
head ``h`` is ``h // G`` and is picked in the BlockSpec index maps, so K/V are never repeated.

Forward: one program per (query block, batch, query head) streams the key blocks with an online
softmax (float32 max, normaliser and accumulator) and also writes the log-sum-exp ``[B, H, T]``.
Backward (``jax.custom_vjp``) recomputes probabilities from that log-sum-exp in two kernels:
one per (query block, batch, query head) for dq, and one per (key block, batch, kv head) for
dk/dv that walks every query block of all ``G`` query heads sharing the kv head, so the sum
over the group happens in registers rather than in a ``[B, S, H, D]`` temporary.
Every kernel checks each (query block, key block) tile against positions and segments first and
skips the matmuls of a tile no pair of which is visible (``lax.cond``), so causal masking costs
about half the dense work without assuming positions are sorted.

Any sequence length works: the wrapper pads T and S up to the block sizes (padded keys are
masked by index, padded queries see nothing) and pads head_dim to a power of two >= 16, then
slices the result back. A query row that sees no key at all yields zeros (and zero gradients),
never NaN; the reference instead averages V uniformly over such a row, so the two agree on every
row that sees at least one key.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.triton_backend import plt

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: no inf - inf anywhere
_MIN_BLOCK = 16  # tl.dot needs every matmul dimension to be at least 16


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static kernel parameters (hashable: a ``nondiff_argnums`` argument of the custom VJP)."""

    sm_scale: float
    block_q: int
    block_k: int
    kv_len: int  # unpadded S: keys at or past it are padding
    interpret: bool

    @property
    def mask_kv_tail(self) -> bool:
        return self.kv_len % self.block_k != 0


def _dot(a, b, *, contract_a: int = 1, contract_b: int = 0):
    """2-D matmul with float32 accumulation; contraction dims chosen so no explicit transpose."""
    return lax.dot_general(
        a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32
    )


def _visible(cfg: _Config, q_pos, kv_pos, q_seg, kv_seg, kv_start):
    """``[block_q, block_k]`` bool: which (query, key) pairs of this tile may attend."""
    mask = kv_pos[None, :] <= q_pos[:, None]
    if q_seg is not None:
        mask = mask & (q_seg[:, None] == kv_seg[None, :])
    if cfg.mask_kv_tail:
        kv_idx = kv_start + lax.broadcasted_iota(jnp.int32, (cfg.block_k,), 0)
        mask = mask & (kv_idx < cfg.kv_len)[None, :]
    return mask


def _when_visible(mask, update, carry):
    """``update(carry)`` if any pair of the tile is visible, else ``carry`` unchanged.

    Skips the matmuls of tiles that are wholly masked (the upper triangle under causal masking,
    other documents, unwritten cache), whatever the layout of positions and segments.
    """
    any_visible = jnp.max(jnp.max(mask.astype(jnp.int32), axis=1), axis=0) > 0
    return lax.cond(any_visible, update, lambda c: c, carry)


def online_softmax_init(rows: int, head_dim: int):
    """The empty running state ``(acc [rows, D], max [rows], normaliser [rows])``, float32."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), _MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_softmax_step(carry, q, k, v, mask, sm_scale: float):
    """Fold one key block into the running state: ``q [rows, D]``, ``k/v [bk, D]``, ``mask [rows, bk]``."""
    acc, m_prev, l_prev = carry
    s = _dot(q, k, contract_b=1) * jnp.float32(sm_scale)  # [rows, bk] f32
    s = jnp.where(mask, s, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(mask, jnp.exp(s - m_next[:, None]), 0.0)
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_next


def online_softmax_finish(acc, m, l):
    """``(out [rows, D], lse [rows])`` float32; a row that saw no key gives 0 (not 0/0) and lse ~ mask value."""
    l_safe = jnp.where(l == 0.0, 1.0, l)
    return acc / l_safe[:, None], m + jnp.log(l_safe)


def _compiler_params(head_dim: int):
    return plt.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


# --------------------------------------------------------------------------------------------
# forward


def _fwd_kernel(*refs, cfg: _Config, has_segments: bool, num_kv_blocks: int):
    if has_segments:
        q_ref, k_ref, v_ref, qpos_ref, kvpos_ref, qseg_ref, kvseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, qpos_ref, kvpos_ref, o_ref, lse_ref = refs
        qseg_ref = kvseg_ref = None
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]  # [bq, D]
    q_pos = qpos_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry):
        start = pl.multiple_of(j * bk, bk)
        kv_slice = pl.ds(start, bk)
        kv_seg = None if kvseg_ref is None else kvseg_ref[kv_slice]
        mask = _visible(cfg, q_pos, kvpos_ref[kv_slice], q_seg, kv_seg, start)

        def update(carry):
            return online_softmax_step(carry, q, k_ref[kv_slice, :], v_ref[kv_slice, :], mask, cfg.sm_scale)

        return _when_visible(mask, update, carry)

    carry = lax.fori_loop(0, num_kv_blocks, body, online_softmax_init(bq, q_ref.shape[-1]))
    out, lse = online_softmax_finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _segment_args(q_seg, kv_seg, q_spec, kv_spec):
    if q_seg is None:
        return [], []
    return [q_seg, kv_seg], [q_spec, kv_spec]


def _forward(cfg: _Config, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    G = H // K
    bq, bk = cfg.block_q, cfg.block_k
    grid = (T // bq, B, H)
    seg_args, seg_specs = _segment_args(
        q_seg, kv_seg,
        pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
        pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
    )
    kernel = functools.partial(
        _fwd_kernel, cfg=cfg, has_segments=q_seg is not None, num_kv_blocks=S // bk
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
            pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
            *seg_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((B, H, T), jnp.float32),
        ],
        compiler_params=_compiler_params(D),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(q, k, v, q_pos, kv_pos, *seg_args)


# --------------------------------------------------------------------------------------------
# backward


def _dq_kernel(*refs, cfg: _Config, has_segments: bool, num_kv_blocks: int):
    if has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref,
         qseg_ref, kvseg_ref, dq_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref, dq_ref = refs
        qseg_ref = kvseg_ref = None
    bk = cfg.block_k
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = qpos_ref[...]
    q_seg = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        kv_slice = pl.ds(start, bk)
        kv_seg = None if kvseg_ref is None else kvseg_ref[kv_slice]
        mask = _visible(cfg, q_pos, kvpos_ref[kv_slice], q_seg, kv_seg, start)

        def update(dq):
            k = k_ref[kv_slice, :]
            v = v_ref[kv_slice, :]
            s = _dot(q, k, contract_b=1) * jnp.float32(cfg.sm_scale)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
            dp = _dot(do, v, contract_b=1)
            ds = p * (dp - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k)

        return _when_visible(mask, update, dq)

    dq = jnp.zeros((cfg.block_q, q_ref.shape[-1]), jnp.float32)
    dq = lax.fori_loop(0, num_kv_blocks, body, dq)
    dq_ref[...] = (dq * jnp.float32(cfg.sm_scale)).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Config, has_segments: bool, num_q_blocks: int, group: int):
    if has_segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref,
         qseg_ref, kvseg_ref, dk_ref, dv_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref, dk_ref, dv_ref = refs
        qseg_ref = kvseg_ref = None
    bq, bk = cfg.block_q, cfg.block_k
    k = k_ref[...]  # [bk, D]
    v = v_ref[...]
    kv_pos = kvpos_ref[...]
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]
    kv_start = pl.program_id(0) * bk

    def body(n, carry):
        # n >= 0, so truncating div/rem suffice (jnp's floor // and % do not lower to Triton)
        g = lax.div(n, jnp.int32(num_q_blocks))  # query head within the group
        start = pl.multiple_of(lax.rem(n, jnp.int32(num_q_blocks)) * bq, bq)
        q_slice = pl.ds(start, bq)
        q_seg = None if qseg_ref is None else qseg_ref[q_slice]
        mask = _visible(cfg, qpos_ref[q_slice], kv_pos, q_seg, kv_seg, kv_start)

        def update(carry):
            dk, dv = carry
            q = q_ref[q_slice, g, :]
            do = do_ref[q_slice, g, :]
            lse = lse_ref[g, q_slice]
            delta = delta_ref[g, q_slice]
            s = _dot(q, k, contract_b=1) * jnp.float32(cfg.sm_scale)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
            dv = dv + _dot(p.astype(do.dtype), do, contract_a=0)
            dp = _dot(do, v, contract_b=1)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot(ds.astype(q.dtype), q, contract_a=0)
            return dk, dv

        return _when_visible(mask, update, carry)

    zeros = jnp.zeros((bk, k_ref.shape[-1]), jnp.float32)
    dk, dv = lax.fori_loop(0, group * num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * jnp.float32(cfg.sm_scale)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(cfg: _Config, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do):
    B, T, H, D = q.shape
    _, S, K, _ = k.shape
    G = H // K
    bq, bk = cfg.block_q, cfg.block_k
    has_segments = q_seg is not None
    # delta_t = sum_d o_td * do_td = sum_s p_ts dp_ts: the softmax-Jacobian correction per row.
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))

    seg_args, seg_specs = _segment_args(
        q_seg, kv_seg,
        pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
        pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, has_segments=has_segments, num_kv_blocks=S // bk),
        grid=(T // bq, B, H),
        in_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),  # q
            pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),  # k
            pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h // G, 0)),  # v
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),  # do
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),  # lse
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),  # delta
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),  # q positions
            pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),  # kv positions
            *seg_specs,
        ],
        out_specs=pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(D),
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, q_pos, kv_pos, *seg_args)

    # One program per (key block, batch, kv head); it reads the G query heads h = kvh*G + g,
    # which are contiguous in the head axis, so a head block of size G indexed by kvh selects them.
    seg_args, seg_specs = _segment_args(
        q_seg, kv_seg,
        pl.BlockSpec((None, T), lambda j, b, kh: (b, 0)),
        pl.BlockSpec((None, bk), lambda j, b, kh: (b, j)),
    )
    dk, dv = pl.pallas_call(
        functools.partial(
            _dkdv_kernel, cfg=cfg, has_segments=has_segments, num_q_blocks=T // bq, group=G
        ),
        grid=(S // bk, B, K),
        in_specs=[
            pl.BlockSpec((None, T, G, D), lambda j, b, kh: (b, 0, kh, 0)),  # q (group heads)
            pl.BlockSpec((None, bk, None, D), lambda j, b, kh: (b, j, kh, 0)),  # k
            pl.BlockSpec((None, bk, None, D), lambda j, b, kh: (b, j, kh, 0)),  # v
            pl.BlockSpec((None, T, G, D), lambda j, b, kh: (b, 0, kh, 0)),  # do (group heads)
            pl.BlockSpec((None, G, T), lambda j, b, kh: (b, kh, 0)),  # lse
            pl.BlockSpec((None, G, T), lambda j, b, kh: (b, kh, 0)),  # delta
            pl.BlockSpec((None, T), lambda j, b, kh: (b, 0)),  # q positions
            pl.BlockSpec((None, bk), lambda j, b, kh: (b, j)),  # kv positions
            *seg_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, D), lambda j, b, kh: (b, j, kh, 0)),
            pl.BlockSpec((None, bk, None, D), lambda j, b, kh: (b, j, kh, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(D),
        interpret=cfg.interpret,
        name="flash_attention_dkdv",
    )(q, k, v, do, lse, delta, q_pos, kv_pos, *seg_args)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom VJP over padded operands


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg):
    return _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]


def _flash_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg):
    o, lse = _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return o, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
    dq, dk, dv = _backward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "interpret"))
def flash_attention(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    q_positions_BxT: jax.Array,
    kv_positions_BxS: jax.Array,
    q_segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int = 64,
    block_k: int = 64,
    interpret: bool = False,
) -> jax.Array:
    """Grouped-query flash attention; returns ``[batch, q_len, heads, head_dim]`` in q's dtype.

    Arguments and masking as in :func:`pallas_kernels.reference.attention_reference`.
    ``block_q``/``block_k`` are tile sizes of the Triton kernels (powers of two, at least 16;
    shrunk for short sequences); :data:`pallas_kernels.table.BLOCKS` holds the ones compiled
    and checked for each GPU. ``interpret=True`` runs the kernels in the Pallas interpreter.
    """
    assert _is_power_of_two(block_q) and _is_power_of_two(block_k), (
        f"block sizes must be powers of two (Triton), got block_q={block_q}, block_k={block_k}")
    assert block_q >= _MIN_BLOCK and block_k >= _MIN_BLOCK, (
        f"block sizes must be at least {_MIN_BLOCK} (tl.dot), got {block_q}, {block_k}")
    B, T, H, D = q_BxTxHxD.shape
    _, S, K, _ = k_BxSxKxD.shape
    if H % K:
        raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
    if k_BxSxKxD.shape != v_BxSxKxD.shape or (k_BxSxKxD.shape[0], k_BxSxKxD.shape[3]) != (B, D):
        raise ValueError(f"k {k_BxSxKxD.shape} and v {v_BxSxKxD.shape} do not match q {q_BxTxHxD.shape}")
    if not (q_BxTxHxD.dtype == k_BxSxKxD.dtype == v_BxSxKxD.dtype):
        raise ValueError("q, k and v must share one dtype")
    scale = D**-0.5 if sm_scale is None else float(sm_scale)

    q_seg, kv_seg = q_segment_ids_BxT, kv_segment_ids_BxS
    if q_seg is None:
        kv_seg = None  # as in the reference: kv segment ids alone mask nothing
    elif kv_seg is None:
        kv_seg = q_seg

    bq = min(block_q, max(_MIN_BLOCK, _next_power_of_two(T)))
    bk = min(block_k, max(_MIN_BLOCK, _next_power_of_two(S)))
    Tp, Sp = pl.cdiv(T, bq) * bq, pl.cdiv(S, bk) * bk
    Dp = max(_MIN_BLOCK, _next_power_of_two(D))
    i32 = jnp.iinfo(jnp.int32)

    q = _pad_axis(_pad_axis(q_BxTxHxD, 1, Tp), 3, Dp)
    k = _pad_axis(_pad_axis(k_BxSxKxD, 1, Sp), 3, Dp)
    v = _pad_axis(_pad_axis(v_BxSxKxD, 1, Sp), 3, Dp)
    # Padded queries precede everything and padded keys follow everything (the kernels also mask
    # keys past S by index), so padding is never visible.
    q_pos = _pad_axis(q_positions_BxT.astype(jnp.int32), 1, Tp, i32.min)
    kv_pos = _pad_axis(kv_positions_BxS.astype(jnp.int32), 1, Sp, i32.max)
    if q_seg is not None:
        q_seg = _pad_axis(q_seg.astype(jnp.int32), 1, Tp, -1)
        kv_seg = _pad_axis(kv_seg.astype(jnp.int32), 1, Sp, -2)

    cfg = _Config(sm_scale=scale, block_q=bq, block_k=bk, kv_len=S, interpret=interpret)
    out = _flash(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg)
    return out[:, :T, :, :D]
