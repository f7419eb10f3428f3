"""Models whose attention goes through ringattn's sequence-parallel front door."""
from .generation import KVCache, generate
from .llama import Llama, LlamaConfig

__all__ = ["KVCache", "Llama", "LlamaConfig", "generate"]
