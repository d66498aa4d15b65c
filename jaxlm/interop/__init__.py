"""Interoperability with other checkpoint formats: Hugging Face safetensors and llama.cpp GGUF."""

from jaxlm.interop.gguf import from_gguf
from jaxlm.interop.hf import from_hf, to_hf

__all__ = ["from_gguf", "from_hf", "to_hf"]
