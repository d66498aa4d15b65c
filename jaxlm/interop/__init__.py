"""Interoperability with other checkpoint formats: Hugging Face safetensors and llama.cpp GGUF."""

from jaxlm.interop.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
