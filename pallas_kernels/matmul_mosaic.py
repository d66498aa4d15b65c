"""GEMM for Hopper (sm_90) in Pallas Mosaic GPU: TMA loads, swizzled shared memory, wgmma.

``matmul_mosaic(a_MxK, b_KxN) -> c_MxN`` (bfloat16 or float16 inputs, float32 accumulation):
one CTA per ``[tile_m, tile_n]`` output tile, one warpgroup. A ``max_concurrent_steps``-deep
pipeline (:func:`plgpu.emit_pipeline`) streams ``[tile_m, tile_k]`` slices of A and
``[tile_k, tile_n]`` slices of B by TMA into shared memory tiled ``(8, swizzle)`` and swizzled
128 bytes wide, where ``wgmma`` reads them and accumulates into registers; one wgmma stays in
flight while the next slices land (``delay_release=1``). The epilogue casts the accumulator
into shared memory and writes it back with one TMA store.

A smaller cousin of ``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`` (no warp
specialisation, no persistent grid, no clusters). Shapes must be whole tiles
(:func:`unsupported_reason`); the kernel table selects the Triton kernel for the rest.

Status: the tests lower it for CUDA (a ``mosaic_gpu`` custom call) and run it in the Mosaic
GPU interpreter on CPU against ``jnp.dot`` with the race detector on. The interpreter treats
``wgmma`` as synchronous, so the ordering of ``wgmma_wait`` against the refill of a pipeline slot
is checked only on hardware; the kernel has not yet been run or timed on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SWIZZLE = 128  # bytes: the widest TMA/wgmma swizzle


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One CTA's output tile and K slice, and how many slices are in flight."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64  # 128 bytes of bf16/fp16: one swizzle row
    max_concurrent_steps: int = 4

    def describe(self) -> str:
        return f"{self.tile_m}x{self.tile_n}x{self.tile_k} stages={self.max_concurrent_steps}"


def pick_tiles(M: int, N: int, K: int, dtype) -> Tiles:
    """128x128 tiles, or 64 rows/columns where that is what divides the problem."""
    tile_k = _SWIZZLE // jnp.dtype(dtype).itemsize
    return Tiles(
        tile_m=128 if M % 128 == 0 else 64,
        tile_n=128 if N % 128 == 0 else 64,
        tile_k=tile_k,
        max_concurrent_steps=max(1, min(4, K // tile_k)),
    )


def unsupported_reason(M: int, N: int, K: int, dtype) -> str | None:
    """Why the kernel cannot take ``[M, K] @ [K, N]`` of ``dtype`` (None when it can)."""
    if jnp.dtype(dtype) not in _DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    t = pick_tiles(M, N, K, dtype)
    if M % t.tile_m or N % t.tile_n or K % t.tile_k:
        return f"shape M={M} N={N} K={K} (needs M, N multiples of 64 and K of {t.tile_k})"
    return None


def _kernel(a_gmem, b_gmem, out_gmem, *, tiles: Tiles, k_steps: int):
    tm, tn, tk = tiles.tile_m, tiles.tile_n, tiles.tile_k
    dtype, out_dtype = a_gmem.dtype, out_gmem.dtype
    swizzle_elems = _SWIZZLE // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(_SWIZZLE))
    out_swizzle = plgpu.find_swizzle(tn * jnp.dtype(out_dtype).itemsize * 8)
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
        plgpu.SwizzleTransform(out_swizzle),
    )
    m_slice = pl.ds(lax.axis_index("m") * tm, tm)
    n_slice = pl.ds(lax.axis_index("n") * tn, tn)

    # the register accumulator and the shared-memory buffers live in separate scopes
    @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((tm, tn), out_dtype, transforms=out_transforms))
    def _smem_scope(out_smem):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), jnp.float32))
        def _acc_scope(acc_ref):
            def step(_, a_smem, b_smem):
                plgpu.wgmma(acc_ref, a_smem, b_smem)
                plgpu.wgmma_wait(1)  # the previous wgmma is done: its slices may be refilled

            delay = min(1, tiles.max_concurrent_steps - 1)
            plgpu.emit_pipeline(
                step,
                grid=(k_steps,),
                in_specs=[
                    plgpu.BlockSpec((tm, tk), lambda k: (0, k), transforms=transforms, delay_release=delay),
                    plgpu.BlockSpec((tk, tn), lambda k: (k, 0), transforms=transforms, delay_release=delay),
                ],
                max_concurrent_steps=tiles.max_concurrent_steps,
            )(a_gmem.at[m_slice, :], b_gmem.at[:, n_slice])
            plgpu.wgmma_wait(0)
            out_smem[...] = acc_ref[...].astype(out_dtype)

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[m_slice, n_slice])
        plgpu.wait_smem_to_gmem(0)


def _mosaic(a, b, *, out_dtype, interpret=None):
    (M, K), N = a.shape, b.shape[1]
    tiles = pick_tiles(M, N, K, a.dtype)
    return plgpu.kernel(
        functools.partial(_kernel, tiles=tiles, k_steps=K // tiles.tile_k),
        out_type=jax.ShapeDtypeStruct((M, N), out_dtype),
        grid=(M // tiles.tile_m, N // tiles.tile_n),
        grid_names=("m", "n"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
    )(a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a, b, out_dtype, interpret):
    return _mosaic(a, b, out_dtype=out_dtype, interpret=interpret)


def _matmul_fwd(a, b, out_dtype, interpret):
    return _matmul(a, b, out_dtype, interpret), (a, b)


def _matmul_bwd(out_dtype, interpret, res, dc):
    a, b = res
    dc = dc.astype(a.dtype)
    return matmul(dc, b.T, interpret=interpret), matmul(a.T, dc, interpret=interpret)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(a_MxK: jax.Array, b_KxN: jax.Array, *, out_dtype=None, interpret=None) -> jax.Array:
    """``a_MxK @ b_KxN`` on the Hopper kernel, accumulated in float32; differentiable.

    A shape or dtype the kernel cannot take raises ValueError (:mod:`pallas_kernels.table`
    selects the Triton kernel for those). ``interpret``: ``None`` compiles for the GPU; the
    Mosaic GPU interpreter's parameters (``InterpretGPUParams``, which jax exports under no public
    name, so the caller builds it) run the Mosaic GPU interpreter on CPU.
    """
    (M, K), N = a_MxK.shape, b_KxN.shape[1]
    out_dtype = jnp.dtype(out_dtype or a_MxK.dtype)
    reason = unsupported_reason(M, N, K, a_MxK.dtype)
    if reason is not None or b_KxN.dtype != a_MxK.dtype:
        reason = reason or f"mixed dtypes {a_MxK.dtype.name}, {b_KxN.dtype.name}"
        raise ValueError(f"matmul_mosaic cannot take {reason}; use pallas_kernels.matmul.matmul")
    return _matmul(a_MxK, b_KxN, out_dtype, interpret)
