"""Which attention implementation runs, decided in one table by (impl, platform).

``auto`` resolves per platform; an explicit choice that cannot run raises one line. Pallas GPU
kernels register here as they land; until then every platform uses the XLA reference, and the
choice is reported once (loudly) rather than taken silently on an accelerator.
"""

from __future__ import annotations

import warnings

import jax

from jaxlm.config import ConfigError
from pallas_kernels.reference import attention_reference

ATTENTION_IMPLS = {"xla": attention_reference}
_AUTO = {"cpu": "xla", "gpu": "xla", "cuda": "xla", "rocm": "xla", "tpu": "xla"}


def resolve_attention_impl(impl: str, platform: str | None = None) -> str:
    """Map a config value (``auto`` | ``xla``) to a concrete implementation name."""
    platform = platform or jax.default_backend()
    if impl == "auto":
        name = _AUTO.get(platform, "xla")
        if platform != "cpu" and name == "xla":  # loud, never a silent slow path (shown once)
            warnings.warn(f"attention: no Pallas kernel registered for {platform} yet; using the XLA reference")
        return name
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl '{impl}' is not available; choose one of auto, {', '.join(ATTENTION_IMPLS)}")
    return impl


def attention(q, k, v, *, q_positions, kv_positions, segment_ids=None, impl: str = "auto"):
    """The model's only door to attention. Shapes as in :func:`attention_reference`.

    ``segment_ids`` (``[batch, q_len]``) apply only when queries and keys are the same tokens
    (training on packed documents); cached decoding masks by positions alone.
    """
    fn = ATTENTION_IMPLS[resolve_attention_impl(impl)]
    return fn(
        q, k, v,
        q_positions_BxT=q_positions,
        kv_positions_BxS=kv_positions,
        q_segment_ids_BxT=segment_ids,
        kv_segment_ids_BxS=segment_ids,
    )
