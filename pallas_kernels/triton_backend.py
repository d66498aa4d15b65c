"""Pallas's Triton backend (``jax.experimental.pallas.triton``), for as long as jax ships it.

The backend is deprecated since jax 0.11 (each lowering warns "The Pallas Triton backend is
deprecated and will be removed") and is still present in jax 0.12.0.1. The Triton kernels
(:mod:`pallas_kernels.flash_attention`, :mod:`pallas_kernels.decode_attention`,
:mod:`pallas_kernels.matmul`) import it from here, so that on a jax without it ``import jaxlm``
still works (the XLA paths and the Mosaic GPU forward kernels need nothing from Triton) and the
first use of a Triton kernel, interpreted or compiled, raises one :class:`ImportError` line that
says what is missing and what to run instead. See docs/kernels.md.
"""

from __future__ import annotations

import jax

try:
    from jax.experimental.pallas import triton as _triton
except ImportError:  # removed from jax
    _triton = None

AVAILABLE: bool = _triton is not None


def missing_message() -> str:
    """The one line raised when a Triton kernel is used on a jax without the backend."""
    return (
        f"the Pallas Triton backend is not in jax {jax.__version__} (deprecated since 0.11, "
        "since removed), so the Triton kernels (flash attention off Hopper and its backward, decode "
        "attention, the GEMMs) cannot run; set model.attention_impl=xla and model.matmul_impl=xla, "
        "or install a jax that has it (jax 0.10.2 to 0.12.0.1 are tested)"
    )


class _Missing:
    """Stands in for the module: any attribute raises :func:`missing_message` as ImportError."""

    def __getattr__(self, name: str):
        raise ImportError(missing_message())


plt = _triton if AVAILABLE else _Missing()
