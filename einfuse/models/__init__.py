"""Built-in tiny models (random weights, no download) for the demo, tests and `einfuse inspect`."""

from .tiny_llama import TinyLlama, TinyLlamaConfig

__all__ = ["TinyLlama", "TinyLlamaConfig"]
