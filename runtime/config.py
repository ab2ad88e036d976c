"""How an LLM runs an artifact: one dataclass, its defaults declared here once.

The CLI (``generate``, ``serve``, ``bench``), the server's ``ServerConfig.llm`` and tests build it with
keywords; ``LLM(artifact, max_slots=2)`` is shorthand for ``LLM(artifact, LLMConfig(max_slots=2))``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from graphopt.core.errors import RuntimeInputError

if TYPE_CHECKING:  # light at import: the CLI reads the defaults below for its --help
    from graphopt.runtime.speculative import SpecConfig

DEFAULT_MAX_SLOTS = 8  # sequences decoded together
DEFAULT_MAX_SEQ = 2048  # context per slot when neither the caller nor a fixed-length graph says otherwise


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Engine, scheduler and speculation settings.

    max_slots: requests decoded together (rows of the KV slot cache).
    max_seq: context per slot; None is min(DEFAULT_MAX_SEQ, the artifact's).
    max_batch_tokens: prompt tokens per prefill step (longer prompts are prefilled in chunks).
    max_queue: requests waiting for a slot; more are refused as overloaded.
    threads: ONNX Runtime intra-op threads; None is the number of physical cores.
    speculative: speculative decoding (a draft artifact or n-gram lookup), or None.
    prefix_cache: start each request from the longest prefix whose KV a slot holds (runtime/prefix_cache.py).
    """

    max_slots: int = DEFAULT_MAX_SLOTS
    max_seq: int | None = None
    max_batch_tokens: int = 256
    max_queue: int = 128
    threads: int | None = None
    speculative: SpecConfig | None = None
    prefix_cache: bool = True

    def with_settings(self, **settings) -> LLMConfig:
        """This config with ``settings`` replaced; an unknown name is a one-line error."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise RuntimeInputError(f"unknown LLM setting {unknown[0]!r}; use one of {', '.join(sorted(names))}")
        return dataclasses.replace(self, **settings)


DEFAULTS = LLMConfig()
MAX_SEQ_HELP = f"Context per slot (default: min({DEFAULT_MAX_SEQ}, the artifact's))."
