"""Attention (and, later, matmul) cores: kernels, their pure-JAX references, and the dispatch.

The model calls only :func:`attention` and, over a KV cache, :func:`cached_attention`;
:mod:`pallas_kernels.dispatch` decides which implementation runs for the platform and config,
in one place.
"""

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.dispatch import ATTENTION_IMPLS, attention, cached_attention, resolve_attention_impl
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference, decode_attention_reference

__all__ = [
    "ATTENTION_IMPLS", "attention", "attention_reference", "cached_attention", "decode_attention",
    "decode_attention_reference", "flash_attention", "resolve_attention_impl",
]
