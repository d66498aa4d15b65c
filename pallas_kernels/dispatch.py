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
"""

from __future__ import annotations

import functools
import warnings

import jax

from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference

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
    from jaxlm.config import ConfigError  # imported here: jaxlm imports this package

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


def _pallas(q, k, v, q_pos, kv_pos, *segs, interpret: bool, backend: str):
    seg = segs[0] if segs else None
    return flash_attention(
        q, k, v, q_positions_BxT=q_pos, kv_positions_BxS=kv_pos,
        q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg, interpret=interpret, backend=backend,
    )


def _cudnn(q, k, v, q_pos, kv_pos, *segs):
    del q_pos, kv_pos  # self-attention with ordered positions: causal by index (see above)
    mask = None if not segs else (segs[0][:, None, :, None] == segs[0][:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def attention(q, k, v, *, q_positions, kv_positions, segment_ids=None, impl: str = "auto"):
    """The model's only door to attention. Shapes as in :func:`attention_reference`.

    ``segment_ids`` (``[batch, q_len]``) apply only when queries and keys are the same tokens
    (training on packed documents); cached decoding masks by positions alone.
    """
    from jaxlm.config import ConfigError

    name = resolve_attention_impl(impl)
    if name == "xla":
        return attention_reference(
            q, k, v, q_positions_BxT=q_positions, kv_positions_BxS=kv_positions,
            q_segment_ids_BxT=segment_ids, kv_segment_ids_BxS=segment_ids,
        )
    from sharding.rules import logical_spec

    if name == "cudnn":
        if kv_positions is not q_positions:
            raise ConfigError("attention_impl 'cudnn' cannot express position masks over a KV cache "
                              "(decoding); use 'pallas' or 'xla' for generation")
        fn = _cudnn
    else:
        backend = "mosaic" if name == "pallas_mosaic" else "triton"
        fn = functools.partial(_pallas, interpret=jax.default_backend() == "cpu", backend=backend)
    args = (q, k, v, q_positions, kv_positions) + (() if segment_ids is None else (segment_ids,))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*args)
    heads = logical_spec(("batch", "seq", "act_heads", "head_dim"))
    tokens = logical_spec(("batch", "seq"))
    specs = (heads, heads, heads, tokens, tokens) + (() if segment_ids is None else (tokens,))
    # check_vma off: the Pallas interpreter, Triton, Mosaic and cuDNN calls carry no varying-axes
    # annotations
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)
