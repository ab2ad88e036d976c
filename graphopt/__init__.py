"""graphopt: a compiler for LLM inference graphs.

``from graphopt import LLM, LLMConfig, SamplingParams`` is the runtime's Python API. The names load on first
use (PEP 562), so ``graphopt build`` and the other commands do not import the runtime for them.
"""

__version__ = "0.1.0"

_PUBLIC = {"LLM": "graphopt.runtime.llm", "LLMConfig": "graphopt.runtime.config",
           "SamplingParams": "graphopt.runtime.sampler"}
__all__ = ["LLM", "LLMConfig", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
