"""The model's doors to its kernels: attention, attention over a KV cache, projections, SwiGLU.

Each door describes the call (:class:`pallas_kernels.table.Call`: dtype, head_dim, segment ids,
cache layout, GEMM shape), asks :func:`pallas_kernels.table.select` what runs on this machine
(:func:`device_info`) under the config's ``attention_impl`` / ``matmul_impl``, warns the
selection's reason once when it is a substitution, and runs the selected kernel with its
blocks -- per shard under ``shard_map`` (batch over the data axes, heads over ``tensor``) when
a mesh is active, so every layout composes. The table, its candidates and how selection works
are in :mod:`pallas_kernels.table`; ``jaxlm kernels CONFIG`` prints what each call of a model runs.

* ``xla``           :func:`pallas_kernels.reference.attention_reference` / ``jnp.einsum``. On CPU
  this is the fast path (the Pallas kernels only run interpreted there).
* ``flash_triton``  :func:`pallas_kernels.flash_attention.flash_attention` (Triton forward and
  backward); ``flash_mosaic`` the Hopper Mosaic GPU forward with the Triton backward
  (:mod:`pallas_kernels.flash_attention_mosaic`).
* ``cudnn``         ``jax.nn.dot_product_attention(implementation="cudnn")``, ``auto``'s choice on
  NVIDIA GPUs for the calls it takes (measured fastest; :mod:`pallas_kernels.table`). It serves
  self-attention over one call's tokens (``kv_positions is q_positions``: training and
  cache-less prefill) as ``is_causal=True``, which equals masking by positions when positions
  increase along the sequence within each segment (``arange``, or restarting per packed
  document, as :mod:`jaxlm.data` produces them); segment ids become its boolean ``mask``
  (materialised ``[B, 1, T, T]``). Position masks over a KV cache are not expressible with
  ``is_causal``: the table gives cached attention to the Pallas kernels, and a cudnn call with
  other key positions raises one line.
* ``decode_triton`` :func:`pallas_kernels.decode_attention.decode_attention`, flash-decoding
  over a contiguous or paged cache for up to ``DECODE_MAX_QUERY_TOKENS`` new tokens.
* ``matmul_triton`` / ``matmul_mosaic`` / ``swiglu_triton``: :mod:`pallas_kernels.matmul` and
  :mod:`pallas_kernels.matmul_mosaic` on the projection reshaped to a 2-D GEMM. Under a mesh
  activations split over the batch axes, weights are gathered over fsdp by the in_specs and
  split over ``tensor`` on their heads/mlp dims; a projection that contracts a split dim (wo,
  w_down) adds its partial sums with a psum over that axis. The GEMM is selected per shard,
  from the shard's shape.

Device detection (:func:`device_info`): ``jax.devices()[0]``'s ``platform`` and, on NVIDIA
GPUs, ``compute_capability``; under a mesh of compile-only GPUs the mesh's GPU (so a plan on a
CPU machine selects the kernels that GPU would run).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from typing import Iterator

import jax
import jax.numpy as jnp

from pallas_kernels import table
from pallas_kernels.reference import attention_reference, gather_pages
from pallas_kernels.table import DECODE_MAX_QUERY_TOKENS, Call, Selection
from sharding.errors import ConfigError

ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
MATMUL_IMPLS = ("xla", "pallas")
_GPU_PLATFORMS = ("gpu", "cuda")


def _compile_only_gpu():
    """The abstract GPU of the current mesh when kernels are compiled for a GPU that is not here
    (a compile-only mesh on a CPU machine), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    kind = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if kind is not None and kind.platform in _GPU_PLATFORMS and jax.devices()[0].platform not in _GPU_PLATFORMS:
        return kind
    return None


def device_info() -> tuple[str, str | None]:
    """``(platform, compute_capability)`` of the device kernels run on, e.g. ``("gpu", "9.0")``.

    Normally ``jax.devices()[0]``. Under a mesh of compile-only GPUs (``jax.set_mesh`` on a CPU
    machine, :func:`sharding.mesh.make_compile_only_mesh`) it is the mesh's GPU, its compute
    capability looked up by device kind in :data:`sharding.targets.TARGETS`.
    """
    kind = _compile_only_gpu()
    if kind is not None:
        from sharding.targets import target_for_device_kind

        target = target_for_device_kind(kind.device_kind)
        return "gpu", None if target is None else target.compute_capability
    device = jax.devices()[0]
    platform = "gpu" if device.platform in _GPU_PLATFORMS else device.platform
    return platform, getattr(device, "compute_capability", None)


def _deviceless() -> bool:
    """Whether kernels are being compiled for a GPU that is not here (a compile-only mesh)."""
    return _compile_only_gpu() is not None


@functools.cache
def _announce(message: str) -> None:
    warnings.warn(message, stacklevel=4)


_RECORDERS: contextvars.ContextVar[tuple[list[str], ...]] = contextvars.ContextVar("kernel_substitutions", default=())


@contextlib.contextmanager
def substitutions() -> Iterator[list[str]]:
    """Collect the reason of every substitution selected while tracing inside the block (each
    reason once), e.g. for ``jaxlm plan`` to report which kernels it compiled in another's place."""
    found: list[str] = []
    token = _RECORDERS.set(_RECORDERS.get() + (found,))
    try:
        yield found
    finally:
        _RECORDERS.reset(token)


def select(op: str, call: Call, impl: str) -> Selection:
    """:func:`pallas_kernels.table.select` on this machine; a substitution is warned once (and
    recorded by every active :func:`substitutions`)."""
    platform, capability = device_info()
    chosen = table.select(op, call, impl=impl, platform=platform, capability=capability, deviceless=_deviceless())
    if chosen.substituted:
        _announce(chosen.reason)
        for found in _RECORDERS.get():
            if chosen.reason not in found:
                found.append(chosen.reason)
    return chosen


def _whole(op: str, call: Call, impl: str) -> str:
    """The kernel for the unsharded call, unannounced: the per-shard selection (of the shard's
    shape) is the one that runs and reports."""
    platform, capability = device_info()
    return table.select(op, call, impl=impl, platform=platform, capability=capability, deviceless=_deviceless()).kernel


def _interpret() -> bool:
    return device_info()[0] == "cpu"


def _xla(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None):
    return attention_reference(
        q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos, q_segment_ids_BxT=q_seg, kv_segment_ids_BxS=kv_seg,
    )


def _cudnn(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None):
    del q_pos, kv_pos, kv_seg  # self-attention with ordered positions: causal by index (see above)
    mask = None if q_seg is None else (q_seg[:, None, :, None] == q_seg[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _local_kernel(chosen: Selection):
    """The per-shard attention function of a selection."""
    if chosen.kernel == "xla":
        return _xla
    if chosen.kernel == "cudnn":
        return _cudnn

    def run(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None):
        return table.run_attention(chosen.kernel, chosen.blocks, q, k, v, q_pos, kv_pos, q_seg, kv_seg,
                                   interpret=_interpret())

    return run


def _sequence_sharded() -> bool:
    from sharding.context import sequence_shards

    return sequence_shards(jax.sharding.get_abstract_mesh()) > 1


def attention(
    q, k, v, *, q_positions, kv_positions, segment_ids=None, impl: str = "auto", context_impl: str = "all_gather"
):
    """The model's only door to attention. Shapes as in :func:`attention_reference`.

    ``segment_ids`` (``[batch, q_len]``) apply only when queries and keys are the same tokens
    (training on packed documents); cached decoding masks by positions alone. When the current
    mesh splits the sequence, self-attention goes through :func:`sharding.context.context_attention`
    (``context_impl``: ``all_gather`` runs the chosen kernel per shard, ``ring`` its own blocks).
    """
    call = Call(q.dtype, head_dim=q.shape[-1], segment_ids=segment_ids is not None, seq_len=q.shape[1],
                group=q.shape[2] // k.shape[2], sequence_sharded=_sequence_sharded(),
                other_keys=kv_positions is not q_positions)
    return _attention(select("attention", call, impl), q, k, v, q_positions, kv_positions, segment_ids, context_impl)


def _attention(chosen: Selection, q, k, v, q_positions, kv_positions, segment_ids, context_impl="all_gather"):
    from sharding.context import context_attention, sequence_shards
    from sharding.rules import logical_spec, per_shard

    mesh = jax.sharding.get_abstract_mesh()
    if chosen.kernel == "cudnn" and kv_positions is not q_positions:
        raise ConfigError("attention_impl 'cudnn' cannot express position masks over other keys than the "
                          "queries' own; use 'pallas' or 'xla'")
    if sequence_shards(mesh) > 1:
        if q.shape[1] != k.shape[1]:
            raise ValueError("context parallelism serves self-attention only; decode on a mesh with mesh.sequence=1")
        return context_attention(
            q, k, v, positions_BxT=q_positions, segment_ids_BxT=segment_ids, local=_local_kernel(chosen), impl=context_impl
        )
    fn = _local_kernel(chosen)
    segs = () if segment_ids is None else (segment_ids, segment_ids)
    args = (q, k, v, q_positions, kv_positions) + segs
    if chosen.kernel == "xla" or mesh.empty or mesh.size == 1:  # XLA partitions the reference itself
        return fn(*args)
    heads = logical_spec(("batch", "seq", "act_heads", "head_dim"))
    tokens = logical_spec(("batch", "seq"))
    specs = (heads, heads, heads, tokens, tokens) + ((tokens, tokens) if segs else ())
    return per_shard(fn, in_specs=specs, out_specs=heads)(*args)


def cached_attention(q, k_cache, v_cache, *, q_positions, page_table=None, impl: str = "auto"):
    """The model's door to attention over a KV cache: ``[batch, T, heads, head_dim]`` in q's dtype.

    ``k_cache``/``v_cache``: ``[batch, max_len, kv_heads, head_dim]`` holding the token at
    position ``p`` at index ``p`` (this call's tokens already written, see :mod:`jaxlm.cache`);
    ``q_positions``: ``[batch, T]``, consecutive within each row. Query ``t`` sees the cache
    entries at indices ``<= q_positions[:, t]``. With ``page_table`` (int32 ``[batch, pages_per_seq]``)
    the caches are page pools ``[num_pages, page_size, kv_heads, head_dim]`` read through it: the
    decode kernel reads pages in place; the other kernels gather each row's pages first.
    """
    paged = page_table is not None
    call = Call(q.dtype, head_dim=q.shape[-1], cache="paged" if paged else "contiguous", q_len=q.shape[1],
                group=q.shape[2] // k_cache.shape[2], page_size=k_cache.shape[1] if paged else None)
    chosen = select("cached_attention", call, impl)
    if chosen.kernel != "decode_triton":
        if paged:
            k_cache, v_cache = gather_pages(k_cache, page_table), gather_pages(v_cache, page_table)
        S = k_cache.shape[1]
        kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=q_positions.dtype), k_cache.shape[:2])
        return _attention(chosen, q, k_cache, v_cache, q_positions, kv_pos, None)
    from sharding.rules import LOGICAL_RULES, logical_spec, mesh_axis_size, per_shard

    def fn(q, k_cache, v_cache, q_pos, page_table=None):
        # the tokens of one call are consecutive, so the last one's position + 1 is the length
        return table.run_decode(chosen.kernel, chosen.blocks, q, k_cache, v_cache, q_pos[:, -1] + 1, page_table,
                                interpret=_interpret())

    args = (q, k_cache, v_cache, q_positions) + (() if page_table is None else (page_table,))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    heads = logical_spec(("batch", "seq", "act_heads", "head_dim"))
    tokens = logical_spec(("batch", "seq"))
    if page_table is not None:  # every shard holds the whole pool (its kv heads) and its rows' tables
        pool = logical_spec((None, None, "kv_heads", "head_dim"))
        rows = logical_spec(("batch", None))
        return per_shard(fn, in_specs=(heads, pool, pool, tokens, rows), out_specs=heads)(*args)
    if mesh_axis_size(mesh, LOGICAL_RULES["cache_seq"]) > 1:
        raise ValueError("the decode kernel needs each sequence's whole cache on one device; map 'cache_seq' to no mesh axis")
    cache = logical_spec(("batch", "cache_seq", "kv_heads", "head_dim"))
    return per_shard(fn, in_specs=(heads, cache, cache, tokens), out_specs=heads)(*args)


# --------------------------------------------------------------------------------------------
# matmul: the model's projections

# equation -> logical names of (activation, weight); activations are [batch, seq, ...], the
# weight's leading dims contract the activation's trailing ones (the weight's embed dim is None:
# gathered over fsdp). The output is split as the activation's batch and the weight's outputs.
PROJECTIONS: dict[str, tuple[tuple[str | None, ...], tuple[str | None, ...]]] = {
    "bte,ehd->bthd": (("batch", "seq", "act_embed"), (None, "heads", "head_dim")),
    "bthd,hde->bte": (("batch", "seq", "act_heads", "head_dim"), ("heads", "head_dim", None)),
    "bte,ef->btf": (("batch", "seq", "act_embed"), (None, "mlp")),
    "btf,fe->bte": (("batch", "seq", "act_mlp"), ("mlp", None)),
}


def _gemm_shape(x, w) -> tuple[int, int, int]:
    """(M, N, K) of ``[b, t, *c] x [*c, *o]`` as one 2-D GEMM."""
    nc = x.ndim - 2  # contracted dims
    K = 1
    for d in x.shape[2:]:
        K *= d
    N = 1
    for d in w.shape[nc:]:
        N *= d
    return x.shape[0] * x.shape[1], N, K


def _project_2d(x, w, *, impl: str):
    """[b, t, *c] x [*c, *o] -> [b, t, *o] as one [b*t, prod c] @ [prod c, prod o] GEMM (per shard)."""
    chosen = select("projection", Call(x.dtype, mnk=_gemm_shape(x, w)), impl)
    nc = x.ndim - 2
    if chosen.kernel == "xla":
        return jnp.tensordot(x, w, axes=nc)
    out_dims = w.shape[nc:]
    x2 = x.reshape(x.shape[0] * x.shape[1], -1)
    w2 = w.reshape(x2.shape[1], -1)
    return table.run_matmul(chosen.kernel, chosen.blocks, x2, w2, interpret=_interpret()).reshape(*x.shape[:2], *out_dims)


def _fitted_spec(names, shape, mesh):
    """Logical names -> PartitionSpec on ``mesh``, replicating a dim its axes do not divide."""
    from sharding.rules import logical_spec, mesh_axis_size

    spec = logical_spec(names)
    return jax.sharding.PartitionSpec(
        *(axes if size % mesh_axis_size(mesh, axes) == 0 else None for axes, size in zip(spec, shape))
    )


def projection(equation: str, x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """The model's door to its projections: ``jnp.einsum(equation, x, w)`` by the selected kernel.

    ``equation`` is one of :data:`PROJECTIONS` (q/k/v, attention output, SwiGLU gate/up, down).
    Output dtype follows the einsum's (the inputs' common dtype); accumulation is float32.
    """
    if equation not in PROJECTIONS:
        raise ValueError(f"projection '{equation}' is not one of {', '.join(PROJECTIONS)}")
    if _whole("projection", Call(x.dtype, mnk=_gemm_shape(x, w)), impl) == "xla":
        if equation == "bthd,hde->bte":  # one [heads * head_dim] contraction: given two, XLA's CPU
            # layout assignment transposes the weight on every call (a copy of wo per layer per step)
            return jax.numpy.einsum("btk,ke->bte", x.reshape(*x.shape[:2], -1), w.reshape(-1, w.shape[-1]))
        return jax.numpy.einsum(equation, x, w)
    from sharding.rules import per_shard

    fn = functools.partial(_project_2d, impl=impl)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(x, w)
    x_names, w_names = PROJECTIONS[equation]
    x_spec, w_spec = _fitted_spec(x_names, x.shape, mesh), _fitted_spec(w_names, w.shape, mesh)
    nc = x.ndim - 2  # contracted dims
    out_spec = jax.sharding.PartitionSpec(*x_spec[:2], *w_spec[nc:])
    split = [a for axes in w_spec[:nc] if axes for a in ((axes,) if isinstance(axes, str) else axes)]

    def local(x, w):
        out = fn(x, w)
        return jax.lax.psum(out, tuple(split)) if split else out

    return per_shard(local, in_specs=(x_spec, w_spec), out_specs=out_spec)(x, w)


def _swiglu_2d(x, w_gate, w_up, *, impl: str):
    chosen = select("swiglu", Call(x.dtype, mnk=(x.shape[0] * x.shape[1], w_gate.shape[1], x.shape[2])), impl)
    if chosen.kernel == "xla":
        return jax.nn.silu(jnp.einsum("bte,ef->btf", x, w_gate)) * jnp.einsum("bte,ef->btf", x, w_up)
    x2 = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    out = table.run_swiglu(chosen.kernel, chosen.blocks, x2, w_gate, w_up, interpret=_interpret())
    return out.reshape(*x.shape[:2], w_gate.shape[1])


def gated_mlp_hidden(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *, impl: str = "auto") -> jax.Array:
    """SwiGLU's hidden ``silu(x @ w_gate) * (x @ w_up)``: ``[b, t, e] x [e, f] x [e, f] -> [b, t, f]``.

    ``xla`` is the two einsums and the product; ``swiglu_triton`` is the fused kernel
    (:func:`pallas_kernels.matmul.swiglu`; the Hopper kernel has no fused form), which rounds
    once from float32 rather than after each projection. Under a mesh it runs per shard like
    the gate/up :func:`projection`: no reduction is needed.
    """
    if _whole("swiglu", Call(x.dtype, mnk=(x.shape[0] * x.shape[1], w_gate.shape[1], x.shape[2])), impl) == "xla":
        gate = jax.numpy.einsum("bte,ef->btf", x, w_gate)
        return jax.nn.silu(gate) * jax.numpy.einsum("bte,ef->btf", x, w_up)
    from sharding.rules import per_shard

    fn = functools.partial(_swiglu_2d, impl=impl)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(x, w_gate, w_up)
    x_names, w_names = PROJECTIONS["bte,ef->btf"]
    x_spec, w_spec = _fitted_spec(x_names, x.shape, mesh), _fitted_spec(w_names, w_gate.shape, mesh)
    out_spec = jax.sharding.PartitionSpec(*x_spec[:2], w_spec[1])
    return per_shard(fn, in_specs=(x_spec, w_spec, w_spec), out_specs=out_spec)(x, w_gate, w_up)
