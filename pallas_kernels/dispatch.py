"""Which attention implementation runs, decided in one table by (impl, platform, compute capability).

Config ``model.attention_impl`` -> what runs (``resolve_attention_impl``):

=========  ===========================  ==================================  ===========================
impl       CPU                          NVIDIA Hopper (sm_90)               other NVIDIA GPUs
=========  ===========================  ==================================  ===========================
auto       ``xla``                      ``pallas_mosaic``                   ``pallas``
pallas     ``pallas`` (interpreter)     ``pallas_mosaic``                   ``pallas``
cudnn      ConfigError                  ``cudnn``                           ``cudnn``
xla        ``xla``                      ``xla``                             ``xla``
=========  ===========================  ==================================  ===========================

Other platforms (TPU, ROCm): ``auto`` and ``xla`` run the XLA reference (announced once under
``auto``); ``pallas`` and ``cudnn`` raise a one-line ConfigError.

* ``xla``           :func:`pallas_kernels.reference.attention_reference`. On CPU this is the
  fast path (the Pallas kernels only run interpreted there).
* ``pallas``        :func:`pallas_kernels.flash_attention.flash_attention`, Triton forward and
  backward; on CPU in the Pallas interpreter, for debugging.
* ``pallas_mosaic`` the same function with ``backend="mosaic"``: the Mosaic GPU (wgmma + TMA +
  warp-specialised) forward of :mod:`pallas_kernels.flash_attention_mosaic` with the Triton
  backward. Chosen on Hopper because Pallas's Triton backend is deprecated from jax 0.11 and
  Mosaic GPU is its Hopper successor; chosen only because its numerics (forward and the mixed
  forward/backward gradients) are verified against the reference by the Mosaic GPU interpreter
  and it cross-lowers for sm_90 (``MOSAIC_FORWARD_VERIFIED``). Inputs it cannot serve (segment
  ids, float32, head_dim not 64/128) run the Triton kernel with a one-time warning. Not picked
  on other GPUs: the kernel uses sm_90 wgmma instructions.
* ``cudnn``         ``jax.nn.dot_product_attention(implementation="cudnn")``. It serves
  self-attention over one call's tokens (``kv_positions is q_positions``: training and
  cache-less prefill) as ``is_causal=True``, which equals masking by positions when positions
  increase along the sequence within each segment (``arange``, or restarting per packed
  document, as :mod:`jaxlm.data` produces them); segment ids become its boolean ``mask``
  (materialised ``[B, 1, T, T]``). Position masks over a KV cache are not expressible with
  ``is_causal`` and raise one line at dispatch instead of computing something else.

The Pallas and cuDNN kernels run per shard under ``shard_map`` (batch over the data axes, heads
over ``tensor``) when a mesh is active, so they compose with every layout. Device detection is
``jax.devices()[0]``: its ``platform`` and, on NVIDIA GPUs, ``compute_capability``.

Attention over a KV cache (prefill and decoding) has its own door, :func:`cached_attention`: with
``pallas``, calls of at most ``DECODE_MAX_QUERY_TOKENS`` tokens per sequence run the
decode-attention kernel, longer ones the flash kernel; every other impl goes through
:func:`attention` with the cache's positions. A paged cache (page pools and a page table) takes
the same door: the decode kernel reads the pages in place, the other paths gather them first.

With ``cudnn``, attention over a cache runs the Pallas path instead (announced once): cuDNN's
``is_causal`` cannot express masks over a cache. An impossible choice raises one line.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference, gather_pages
from sharding.errors import ConfigError

ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
# Set from the interpreter check in tests/test_flash_attention_mosaic.py (forward and gradient
# against the reference). Flip to False to keep ``auto`` on the Triton kernel on Hopper.
MOSAIC_FORWARD_VERIFIED = True
_HOPPER = "9.0"
_GPU_PLATFORMS = ("gpu", "cuda")


def device_info() -> tuple[str, str | None]:
    """``(platform, compute_capability)`` of the default device, e.g. ``("gpu", "9.0")``."""
    device = jax.devices()[0]
    platform = "gpu" if device.platform in _GPU_PLATFORMS else device.platform
    return platform, getattr(device, "compute_capability", None)


def _pallas_for(platform: str, compute_capability: str | None) -> str:
    hopper = platform == "gpu" and compute_capability == _HOPPER
    return "pallas_mosaic" if hopper and MOSAIC_FORWARD_VERIFIED else "pallas"


def resolve_attention_impl(impl: str, platform: str | None = None, compute_capability: str | None = None) -> str:
    """Map a config value to what runs: ``xla`` | ``pallas`` | ``pallas_mosaic`` | ``cudnn``.

    ``platform`` and ``compute_capability`` default to the default device's (:func:`device_info`);
    pass them to ask about another machine (a pure function of its arguments then).
    """

    if platform is None:
        platform, compute_capability = device_info()
    platform = "gpu" if platform in _GPU_PLATFORMS else platform
    if impl not in ("auto", *ATTENTION_IMPLS):
        raise ConfigError(f"attention_impl '{impl}' is not available; choose one of auto, {', '.join(ATTENTION_IMPLS)}")
    if impl == "xla":
        return "xla"
    if impl == "auto":
        if platform == "cpu":
            return "xla"
        if platform == "gpu":
            return _pallas_for(platform, compute_capability)
        warnings.warn(  # loud, never a silent slow path (shown once)
            f"attention: using the XLA reference on {platform}; no Pallas kernel for this platform"
        )
        return "xla"
    if impl == "pallas":
        if platform not in ("cpu", "gpu"):
            raise ConfigError(f"attention_impl 'pallas' has no kernel for platform '{platform}'; use 'xla' or 'auto'")
        return _pallas_for(platform, compute_capability)
    if platform != "gpu":  # cudnn
        raise ConfigError(f"attention_impl 'cudnn' needs an NVIDIA GPU (platform is '{platform}'); use 'xla', 'pallas' or 'auto'")
    return "cudnn"


def _pallas(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *, interpret: bool, backend: str):
    return flash_attention(
        q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos,
        q_segment_ids_BxT=q_seg, kv_segment_ids_BxS=kv_seg, interpret=interpret, backend=backend,
    )


def _xla(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None):
    return attention_reference(
        q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos, q_segment_ids_BxT=q_seg, kv_segment_ids_BxS=kv_seg,
    )


def _cudnn(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None):
    del q_pos, kv_pos, kv_seg  # self-attention with ordered positions: causal by index (see above)
    mask = None if q_seg is None else (q_seg[:, None, :, None] == q_seg[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _local_kernel(name: str):
    """The per-shard function for a resolved implementation name."""
    if name == "xla":
        return _xla
    if name == "cudnn":
        return _cudnn
    backend = "mosaic" if name == "pallas_mosaic" else "triton"
    return functools.partial(_pallas, interpret=jax.default_backend() == "cpu", backend=backend)


@functools.cache
def _announce(message: str) -> None:
    warnings.warn(message)


def attention(
    q, k, v, *, q_positions, kv_positions, segment_ids=None, impl: str = "auto", context_impl: str = "all_gather"
):
    """The model's only door to attention. Shapes as in :func:`attention_reference`.

    ``segment_ids`` (``[batch, q_len]``) apply only when queries and keys are the same tokens
    (training on packed documents); cached decoding masks by positions alone. When the current
    mesh splits the sequence, self-attention goes through :func:`sharding.context.context_attention`
    (``context_impl``: ``all_gather`` runs the chosen kernel per shard, ``ring`` its own blocks).
    """
    return _attention(resolve_attention_impl(impl), q, k, v, q_positions, kv_positions, segment_ids, context_impl)


def _attention(name, q, k, v, q_positions, kv_positions, segment_ids, context_impl="all_gather"):
    from sharding.context import context_attention, sequence_shards
    from sharding.rules import logical_spec, per_shard

    mesh = jax.sharding.get_abstract_mesh()
    if name == "cudnn" and kv_positions is not q_positions:
        raise ConfigError("attention_impl 'cudnn' cannot express position masks over a KV cache "
                          "(decoding); use 'pallas' or 'xla' for generation")
    if sequence_shards(mesh) > 1:
        if q.shape[1] != k.shape[1]:
            raise ValueError("context parallelism serves self-attention only; decode on a mesh with mesh.sequence=1")
        if name == "cudnn":  # the gathered keys are not the queries' own tokens: is_causal cannot mask them
            _announce("attention: cudnn cannot mask gathered keys under context parallelism; using the Pallas kernel")
            name = "pallas"
        return context_attention(
            q, k, v, positions_BxT=q_positions, segment_ids_BxT=segment_ids, local=_local_kernel(name), impl=context_impl
        )
    fn = _local_kernel(name)
    segs = () if segment_ids is None else (segment_ids, segment_ids)
    args = (q, k, v, q_positions, kv_positions) + segs
    if name == "xla" or mesh.empty or mesh.size == 1:  # XLA partitions the reference itself
        return fn(*args)
    heads = logical_spec(("batch", "seq", "act_heads", "head_dim"))
    tokens = logical_spec(("batch", "seq"))
    specs = (heads, heads, heads, tokens, tokens) + ((tokens, tokens) if segs else ())
    return per_shard(fn, in_specs=specs, out_specs=heads)(*args)


DECODE_MAX_QUERY_TOKENS = 16  # new tokens per sequence up to which the decode kernel runs


def _pallas_decode(q, k_cache, v_cache, q_pos, page_table=None, *, interpret: bool):
    # the tokens of one call are consecutive, so the last one's position + 1 is the length
    return decode_attention(q, k_cache, v_cache, q_pos[:, -1] + 1, page_table_BxP=page_table, interpret=interpret)


def cached_attention(q, k_cache, v_cache, *, q_positions, page_table=None, impl: str = "auto"):
    """The model's door to attention over a KV cache: ``[batch, T, heads, head_dim]`` in q's dtype.

    ``k_cache``/``v_cache``: ``[batch, max_len, kv_heads, head_dim]`` holding the token at
    position ``p`` at index ``p`` (this call's tokens already written, see :mod:`jaxlm.cache`);
    ``q_positions``: ``[batch, T]``, consecutive within each row. Query ``t`` sees the cache
    entries at indices ``<= q_positions[:, t]``. With ``page_table`` (int32 ``[batch, pages_per_seq]``)
    the caches are page pools ``[num_pages, page_size, kv_heads, head_dim]`` read through it: the
    decode kernel reads pages in place; the other paths gather each row's pages first.
    """
    name = resolve_attention_impl(impl)
    if name == "cudnn":
        _announce("attention: cudnn cannot mask a KV cache; prefill and decoding use the Pallas kernels")
        name = "pallas"
    if name == "xla" or q.shape[1] > DECODE_MAX_QUERY_TOKENS:
        if page_table is not None:
            k_cache, v_cache = gather_pages(k_cache, page_table), gather_pages(v_cache, page_table)
        S = k_cache.shape[1]
        kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=q_positions.dtype), k_cache.shape[:2])
        return _attention(name, q, k_cache, v_cache, q_positions, kv_pos, None)
    from sharding.rules import LOGICAL_RULES, logical_spec, mesh_axis_size, per_shard

    fn = functools.partial(_pallas_decode, interpret=jax.default_backend() == "cpu")
    args = (q, k_cache, v_cache, q_positions) + (() if page_table is None else (page_table,))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    heads = logical_spec(("batch", "seq", "act_heads", "head_dim"))
    tokens = logical_spec(("batch", "seq"))
    if page_table is not None:  # every shard holds the whole pool (its kv heads) and its rows' tables
        pool = logical_spec((None, None, "kv_heads", "head_dim"))
        table = logical_spec(("batch", None))
        return per_shard(fn, in_specs=(heads, pool, pool, tokens, table), out_specs=heads)(*args)
    if mesh_axis_size(mesh, LOGICAL_RULES["cache_seq"]) > 1:
        raise ValueError("the decode kernel needs each sequence's whole cache on one device; map 'cache_seq' to no mesh axis")
    cache = logical_spec(("batch", "cache_seq", "kv_heads", "head_dim"))
    return per_shard(fn, in_specs=(heads, cache, cache, tokens), out_specs=heads)(*args)


# --------------------------------------------------------------------------------------------
# matmul: the model's projections
#
# * ``xla``    - ``jnp.einsum``, exactly the model's einsums, any platform.
# * ``pallas`` - :func:`pallas_kernels.matmul.matmul` (Triton) on the projection reshaped to a
#   2-D GEMM; on CPU it runs in the Pallas interpreter, for debugging. Under a mesh it runs per
#   shard in ``shard_map``: activations split over the batch axes, weights gathered over fsdp by
#   the in_specs and split over ``tensor`` on their heads/mlp dims; a projection that contracts
#   a split dim (wo, w_down) adds its partial sums with a psum over that axis.
#   On a Hopper GPU (sm_90) ``pallas`` runs the Mosaic GPU kernel of
#   :mod:`pallas_kernels.matmul_mosaic` instead (its numerics are checked in the Mosaic GPU
#   interpreter, its CUDA lowering by the tests); shapes it cannot take go to Triton, announced.
# * ``auto``   - ``pallas`` on GPU, ``xla`` elsewhere.

MATMUL_IMPLS = ("xla", "pallas")
_MATMUL_AUTO = {"gpu": "pallas"}

# equation -> logical names of (activation, weight); activations are [batch, seq, ...], the
# weight's leading dims contract the activation's trailing ones (the weight's embed dim is None:
# gathered over fsdp). The output is split as the activation's batch and the weight's outputs.
PROJECTIONS: dict[str, tuple[tuple[str | None, ...], tuple[str | None, ...]]] = {
    "bte,ehd->bthd": (("batch", "seq", "act_embed"), (None, "heads", "head_dim")),
    "bthd,hde->bte": (("batch", "seq", "act_heads", "head_dim"), ("heads", "head_dim", None)),
    "bte,ef->btf": (("batch", "seq", "act_embed"), (None, "mlp")),
    "btf,fe->bte": (("batch", "seq", "act_mlp"), ("mlp", None)),
}


def resolve_matmul_impl(impl: str, platform: str | None = None) -> str:
    """Map a config value (``auto`` | ``xla`` | ``pallas``) to a concrete implementation name."""

    platform = device_info()[0] if platform is None else platform
    platform = "gpu" if platform in _GPU_PLATFORMS else platform
    if impl == "auto":
        return _MATMUL_AUTO.get(platform, "xla")
    if impl not in MATMUL_IMPLS:
        raise ConfigError(f"matmul_impl '{impl}' is not available; choose one of auto, {', '.join(MATMUL_IMPLS)}")
    if impl == "pallas" and platform not in ("cpu", "gpu"):  # cpu: the interpreter
        raise ConfigError(f"matmul_impl 'pallas' has no kernel for platform '{platform}'; use 'xla' or 'auto'")
    return impl


def is_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x)."""
    platform, capability = device_info()
    return platform == "gpu" and str(capability or "").startswith("9.")


def _project_2d(x, w, *, interpret: bool):
    """[b, t, *c] x [*c, *o] -> [b, t, *o] as one [b*t, prod c] @ [prod c, prod o] GEMM."""
    from pallas_kernels.matmul import matmul  # imported here: keeps this section additive
    from pallas_kernels.matmul_mosaic import matmul as matmul_hopper

    gemm = matmul_hopper if not interpret and is_hopper() else functools.partial(matmul, interpret=interpret)
    nc = x.ndim - 2
    out_dims = w.shape[nc:]
    x2 = x.reshape(x.shape[0] * x.shape[1], -1)
    w2 = w.reshape(x2.shape[1], -1)
    return gemm(x2, w2).reshape(*x.shape[:2], *out_dims)


def _fitted_spec(names, shape, mesh):
    """Logical names -> PartitionSpec on ``mesh``, replicating a dim its axes do not divide."""
    from sharding.rules import logical_spec, mesh_axis_size

    spec = logical_spec(names)
    return jax.sharding.PartitionSpec(
        *(axes if size % mesh_axis_size(mesh, axes) == 0 else None for axes, size in zip(spec, shape))
    )


def projection(equation: str, x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """The model's door to its projections: ``jnp.einsum(equation, x, w)`` by ``impl``.

    ``equation`` is one of :data:`PROJECTIONS` (q/k/v, attention output, SwiGLU gate/up, down).
    Output dtype follows the einsum's (the inputs' common dtype); accumulation is float32.
    """
    if equation not in PROJECTIONS:
        raise ValueError(f"projection '{equation}' is not one of {', '.join(PROJECTIONS)}")
    if resolve_matmul_impl(impl) == "xla":
        return jax.numpy.einsum(equation, x, w)
    from sharding.rules import per_shard

    fn = functools.partial(_project_2d, interpret=jax.default_backend() == "cpu")
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


def _swiglu_2d(x, w_gate, w_up, *, interpret: bool):
    from pallas_kernels.matmul import swiglu  # imported here: keeps this section additive

    x2 = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    return swiglu(x2, w_gate, w_up, interpret=interpret).reshape(*x.shape[:2], w_gate.shape[1])


def gated_mlp_hidden(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, *, impl: str = "auto") -> jax.Array:
    """SwiGLU's hidden ``silu(x @ w_gate) * (x @ w_up)``: ``[b, t, e] x [e, f] x [e, f] -> [b, t, f]``.

    ``xla`` is the two einsums and the product; ``pallas`` is the fused kernel
    (:func:`pallas_kernels.matmul.swiglu`, Triton on every GPU: the Hopper kernel has no fused
    form), which rounds once from float32 rather than after each projection. Under a mesh it
    runs per shard like the gate/up :func:`projection`: no reduction is needed.
    """
    if resolve_matmul_impl(impl) == "xla":
        gate = jax.numpy.einsum("bte,ef->btf", x, w_gate)
        return jax.nn.silu(gate) * jax.numpy.einsum("bte,ef->btf", x, w_up)
    from sharding.rules import per_shard

    fn = functools.partial(_swiglu_2d, interpret=jax.default_backend() == "cpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(x, w_gate, w_up)
    x_names, w_names = PROJECTIONS["bte,ef->btf"]
    x_spec, w_spec = _fitted_spec(x_names, x.shape, mesh), _fitted_spec(w_names, w_gate.shape, mesh)
    out_spec = jax.sharding.PartitionSpec(*x_spec[:2], w_spec[1])
    return per_shard(fn, in_specs=(x_spec, w_spec, w_spec), out_specs=out_spec)(x, w_gate, w_up)
