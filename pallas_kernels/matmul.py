"""Tiled GEMM for GPUs: Pallas kernels lowered through Triton, differentiable, plus fused SwiGLU.

``matmul(a_MxK, b_KxN) -> c_MxN``: one program per ``[block_m, block_n]`` output tile walks the
contraction in ``block_k`` slices and accumulates in float32 registers, then casts once to the
output dtype. Programs are numbered in groups of ``GROUP_M`` row-blocks (the order Triton's
tutorial calls "grouped"), so tiles running together share rows of A and columns of B in L2.

Inputs are bfloat16, float16 or float32 (the same dtype for both); float32 runs the tensor cores
in IEEE mode (``Precision.HIGHEST``), not TF32. Any M, N, K work: the wrapper zero-pads each
dimension up to its block (zeros in K add nothing) and slices the result back.

Block sizes come from :data:`BLOCK_TABLE` (:func:`pick_blocks`) and, for the fused SwiGLU,
:data:`SWIGLU_BLOCK_TABLE`; the kernel table (:mod:`pallas_kernels.table`) lists both and every
row is compiled for sm_80 and sm_90 by the tests. Callers may override them (powers of two, at
least 16). The backward pass (``jax.custom_vjp``) runs the same
kernel with a transposed operand read in place (no transpose is materialised):
``dA = dC B^T`` and ``dB = A^T dC``, each with blocks picked for its own shape; ``dC`` is cast
to the inputs' dtype first, so a bf16 GEMM with a float32 output has bf16 backward GEMMs.

:func:`swiglu` fuses ``silu(x @ w_gate) * (x @ w_up)`` into one kernel with two accumulators
(x is read once); its backward recomputes both pre-activations with the GEMM kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.triton_backend import plt

GROUP_M = 8  # row-blocks per program group (L2 reuse)
_MIN_BLOCK = 16  # tl.dot needs every matmul dimension to be at least 16
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile shape and Triton launch parameters of one GEMM."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def describe(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} warps={self.num_warps} stages={self.num_stages}"


# (rows of A, bytes per input element) -> blocks. Rows: "skinny" M <= 16 (decoding: stream the
# weight with wide K slices), "medium" M <= 256, "large" otherwise. float32 tiles are half as
# deep in K so the pipelined shared-memory buffers stay about the same size.
BLOCK_TABLE: dict[tuple[str, int], Blocks] = {
    ("skinny", 2): Blocks(16, 64, 128, num_warps=4, num_stages=4),
    ("skinny", 4): Blocks(16, 64, 64, num_warps=4, num_stages=3),
    ("medium", 2): Blocks(64, 128, 64, num_warps=4, num_stages=4),
    ("medium", 4): Blocks(64, 64, 32, num_warps=4, num_stages=3),
    ("large", 2): Blocks(128, 256, 64, num_warps=8, num_stages=3),
    ("large", 4): Blocks(128, 128, 32, num_warps=8, num_stages=3),
}


# The fused SwiGLU kernel keeps two accumulators, so its tiles are smaller where one-accumulator
# tiles spill (ptxas, sm_80: float32 16x64, 64x64 and 128x64; bfloat16 128x128).
SWIGLU_BLOCK_TABLE: dict[tuple[str, int], Blocks] = {
    ("skinny", 2): Blocks(16, 64, 128, num_warps=4, num_stages=4),
    ("skinny", 4): Blocks(16, 32, 64, num_warps=4, num_stages=3),
    ("medium", 2): Blocks(64, 128, 64, num_warps=8, num_stages=4),
    ("medium", 4): Blocks(32, 64, 32, num_warps=4, num_stages=3),
    ("large", 2): Blocks(64, 128, 64, num_warps=8, num_stages=4),
    ("large", 4): Blocks(32, 64, 32, num_warps=4, num_stages=3),
}


def _row_class(M: int) -> str:
    return "skinny" if M <= 16 else "medium" if M <= 256 else "large"


def pick_blocks(M: int, N: int, K: int, dtype) -> Blocks:
    """The table entry for an ``[M, K] @ [K, N]`` product of ``dtype`` inputs."""
    del N, K  # padded to the block; the table is keyed on what changes the best tile most
    return BLOCK_TABLE[(_row_class(M), 2 if jnp.dtype(dtype).itemsize <= 2 else 4)]


def pick_swiglu_blocks(M: int, F: int, K: int, dtype) -> Blocks:
    """The :data:`SWIGLU_BLOCK_TABLE` entry for ``silu(x @ w_gate) * (x @ w_up)``, ``x: [M, K]``."""
    del F, K
    return SWIGLU_BLOCK_TABLE[(_row_class(M), 2 if jnp.dtype(dtype).itemsize <= 2 else 4)]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _with_overrides(blocks: Blocks, block_m, block_n, block_k, num_warps=None, num_stages=None) -> Blocks:
    b = dataclasses.replace(
        blocks,
        block_m=block_m or blocks.block_m,
        block_n=block_n or blocks.block_n,
        block_k=block_k or blocks.block_k,
        num_warps=num_warps or blocks.num_warps,
        num_stages=num_stages or blocks.num_stages,
    )
    for name in ("block_m", "block_n", "block_k"):
        size = getattr(b, name)
        if not (_is_power_of_two(size) and size >= _MIN_BLOCK):
            raise ValueError(f"matmul {name}={size} must be a power of two >= {_MIN_BLOCK}")
    return b


def _grouped_ids(pid, grid_m: int, grid_n: int):
    """Linear program id -> (row block, column block), GROUP_M row-blocks at a time."""
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = jnp.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


# --------------------------------------------------------------------------------------------
# kernel


@dataclasses.dataclass(frozen=True)
class _Gemm:
    """Static description of one kernel launch (hashable: a ``nondiff_argnums`` argument)."""

    blocks: Blocks
    trans_a: bool = False  # A stored [K, M]
    trans_b: bool = False  # B stored [N, K]
    interpret: bool = False


def _kernel(a_ref, *refs, gemm: _Gemm, num_k: int, precision, epilogue: Callable):
    *b_refs, o_ref = refs
    bm, bn, bk = gemm.blocks.block_m, gemm.blocks.block_n, gemm.blocks.block_k
    ca, cb = (0 if gemm.trans_a else 1), (1 if gemm.trans_b else 0)

    def body(i, accs):
        k = pl.ds(pl.multiple_of(i * bk, bk), bk)
        a = a_ref[k, :] if gemm.trans_a else a_ref[:, k]
        out = []
        for b_ref, acc in zip(b_refs, accs):
            b = b_ref[:, k] if gemm.trans_b else b_ref[k, :]
            dims = (((ca,), (cb,)), ((), ()))
            out.append(acc + lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32))
        return tuple(out)

    accs = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in b_refs)
    accs = lax.fori_loop(0, num_k, body, accs)
    o_ref[...] = epilogue(*accs).astype(o_ref.dtype)


def _gemm(gemm: _Gemm, a, *bs, out_dtype, epilogue: Callable = lambda acc: acc):
    """``epilogue(a @ b for b in bs)`` (float32 accumulators) as one kernel, sliced to [M, N].

    ``a`` is [M, K] (or [K, M] when ``trans_a``), each ``b`` is [K, N] (or [N, K] when ``trans_b``).
    """
    M, K = a.shape[::-1] if gemm.trans_a else a.shape
    N = bs[0].shape[0] if gemm.trans_b else bs[0].shape[1]
    blk = gemm.blocks
    Mp, Np, Kp = _round_up(M, blk.block_m), _round_up(N, blk.block_n), _round_up(K, blk.block_k)
    a = jnp.pad(a, ((0, Kp - K), (0, Mp - M)) if gemm.trans_a else ((0, Mp - M), (0, Kp - K)))
    bs = [jnp.pad(b, ((0, Np - N), (0, Kp - K)) if gemm.trans_b else ((0, Kp - K), (0, Np - N))) for b in bs]
    grid_m, grid_n = Mp // blk.block_m, Np // blk.block_n
    ids = functools.partial(_grouped_ids, grid_m=grid_m, grid_n=grid_n)

    def row_block(pid):
        return ids(pid)[0]

    def col_block(pid):
        return ids(pid)[1]

    if gemm.trans_a:
        a_spec = pl.BlockSpec((Kp, blk.block_m), lambda p: (0, row_block(p)))
    else:
        a_spec = pl.BlockSpec((blk.block_m, Kp), lambda p: (row_block(p), 0))
    if gemm.trans_b:
        b_spec = pl.BlockSpec((blk.block_n, Kp), lambda p: (col_block(p), 0))
    else:
        b_spec = pl.BlockSpec((Kp, blk.block_n), lambda p: (0, col_block(p)))
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    kernel = functools.partial(_kernel, gemm=gemm, num_k=Kp // blk.block_k, precision=precision, epilogue=epilogue)
    out = pl.pallas_call(
        kernel,
        grid=(grid_m * grid_n,),
        in_specs=[a_spec] + [b_spec] * len(bs),
        out_specs=pl.BlockSpec((blk.block_m, blk.block_n), lambda p: (row_block(p), col_block(p))),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), out_dtype),
        compiler_params=plt.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=gemm.interpret,
        name="swiglu" if len(bs) == 2 else "matmul",
    )(a, *bs)
    return out[:M, :N]


def _check(a, bs) -> None:
    for x in (a, *bs):
        if x.ndim != 2:
            raise ValueError(f"matmul takes 2-D operands, got shape {x.shape}; reshape to [rows, features]")
        if x.dtype not in _DTYPES or x.dtype != a.dtype:
            raise ValueError(
                f"matmul needs operands of one dtype among bfloat16, float16, float32; got "
                f"{', '.join(str(y.dtype) for y in (a, *bs))}"
            )
    for b in bs:
        if a.shape[1] != b.shape[0] or b.shape != bs[0].shape:
            raise ValueError(f"matmul shapes do not chain: {a.shape} @ {', '.join(str(b.shape) for b in bs)}")


def _dgrads(a, b, dc, interpret: bool):
    """(dA, dB) of ``c = a @ b`` with the same kernel, each with blocks picked for its shape."""
    (M, K), N = a.shape, b.shape[1]
    dc = dc.astype(a.dtype)
    da = _gemm(_Gemm(pick_blocks(M, K, N, a.dtype), trans_b=True, interpret=interpret), dc, b, out_dtype=a.dtype)
    db = _gemm(_Gemm(pick_blocks(K, N, M, a.dtype), trans_a=True, interpret=interpret), a, dc, out_dtype=b.dtype)
    return da, db


# --------------------------------------------------------------------------------------------
# matmul


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a, b, gemm: _Gemm, out_dtype):
    return _gemm(gemm, a, b, out_dtype=out_dtype)


def _matmul_fwd(a, b, gemm, out_dtype):
    return _gemm(gemm, a, b, out_dtype=out_dtype), (a, b)


def _matmul_bwd(gemm, out_dtype, res, dc):
    a, b = res
    return _dgrads(a, b, dc, gemm.interpret)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(
    a_MxK: jax.Array,
    b_KxN: jax.Array,
    *,
    out_dtype=None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``a_MxK @ b_KxN`` accumulated in float32, returned as ``out_dtype`` (default: the inputs').

    Both inputs share one dtype: bfloat16, float16 or float32. Blocks default to
    :func:`pick_blocks`; explicit ones apply to the forward kernel. ``interpret=True`` runs the
    Pallas interpreter (any backend, for tests and debugging). Differentiable (custom VJP).
    """
    _check(a_MxK, (b_KxN,))
    (M, K), N = a_MxK.shape, b_KxN.shape[1]
    blocks = _with_overrides(pick_blocks(M, N, K, a_MxK.dtype), block_m, block_n, block_k, num_warps, num_stages)
    out_dtype = jnp.dtype(out_dtype or a_MxK.dtype)
    return _matmul(a_MxK, b_KxN, _Gemm(blocks, interpret=interpret), out_dtype)


# --------------------------------------------------------------------------------------------
# fused SwiGLU


def _swiglu_epilogue(gate, up):
    return jax.nn.silu(gate) * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu(x, w_gate, w_up, gemm: _Gemm):
    return _gemm(gemm, x, w_gate, w_up, out_dtype=x.dtype, epilogue=_swiglu_epilogue)


def _swiglu_fwd(x, w_gate, w_up, gemm):
    return _swiglu(x, w_gate, w_up, gemm), (x, w_gate, w_up)


def _swiglu_bwd(gemm, res, dh):
    x, w_gate, w_up = res
    (M, K), F = x.shape, w_gate.shape[1]
    plain = _Gemm(pick_blocks(M, F, K, x.dtype), interpret=gemm.interpret)
    gate = _gemm(plain, x, w_gate, out_dtype=jnp.float32)  # recomputed, float32 like the forward's
    up = _gemm(plain, x, w_up, out_dtype=jnp.float32)
    sig = jax.nn.sigmoid(gate)
    dh = dh.astype(jnp.float32)
    d_up = dh * gate * sig
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(g) = s (1 + g (1 - s))
    dx_g, dw_gate = _dgrads(x, w_gate, d_gate.astype(x.dtype), gemm.interpret)
    dx_u, dw_up = _dgrads(x, w_up, d_up.astype(x.dtype), gemm.interpret)
    return (dx_g.astype(jnp.float32) + dx_u).astype(x.dtype), dw_gate, dw_up


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(
    x_MxK: jax.Array,
    w_gate_KxF: jax.Array,
    w_up_KxF: jax.Array,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``silu(x @ w_gate) * (x @ w_up)`` ``[M, F]`` in one kernel (two float32 accumulators).

    The product is formed in float32 and cast once to ``x.dtype``. Differentiable (custom VJP).
    """
    _check(x_MxK, (w_gate_KxF, w_up_KxF))
    (M, K), F = x_MxK.shape, w_gate_KxF.shape[1]
    blocks = _with_overrides(pick_swiglu_blocks(M, F, K, x_MxK.dtype), block_m, block_n, block_k, num_warps, num_stages)
    return _swiglu(x_MxK, w_gate_KxF, w_up_KxF, _Gemm(blocks, interpret=interpret))
