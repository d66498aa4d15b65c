"""Attention and matmul cores: kernels, their pure-JAX references, the kernel table and the dispatch.

The model calls only :func:`attention`, :func:`cached_attention` (over a KV cache) and the
projections of :mod:`pallas_kernels.dispatch`; :func:`pallas_kernels.table.select` decides which
kernel runs for the platform, config and call, in one table.
"""

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.dispatch import ATTENTION_IMPLS, attention, cached_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_reference, decode_attention_reference
from pallas_kernels.table import Call, Selection, select

__all__ = [
    "ATTENTION_IMPLS", "Call", "Selection", "attention", "attention_reference", "cached_attention", "decode_attention",
    "decode_attention_reference", "flash_attention", "select",
]
