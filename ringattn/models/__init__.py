"""Models whose attention goes through ringattn's sequence-parallel front door."""
from .llama import Llama, LlamaConfig, local_causal_attention

__all__ = ["Llama", "LlamaConfig", "local_causal_attention"]
