"""The engine seam: what the scheduler, LLM, speculation, benchmarks and fidelity may ask of an engine.

    open_engine(artifact) ──► the target's engine (graphopt/targets: OrtEngine for ort-cpu, TrtEngine for trt)
        .capabilities         what it can do in one call; callers read these, never the engine's class
        .step(...)            the contract call: B rows of S tokens over slots first..first+B-1 → logits [B, k, V]
        .prefill(chunks, slots)  append each chunk to its slot's cache → last-token logits [B, V]; the engine
                              groups rows into calls as its graph allows (one call, or one per row)
        .decode(tokens)       one token for each of slots 0..B-1 → logits [B, V]
        .prepare_multi_token()   load what multi-row multi-token steps need (ORT: a second session) now
        .cache                the slot cache (lens, allocate/free/move, views of the K/V buffers)

Logits returned by ``step``/``decode`` are views of the engine's output buffer, overwritten by the next call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from graphopt.core.manifest import Manifest


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one engine call can do.

    multi_row_multi_token: several rows of several tokens on top of a cache in one ``step`` (batched
        speculative verification, batched catch-up). ORT's GroupQueryAttention cannot; an ort-cpu artifact
        with a multi-token graph can, once ``prepare_multi_token`` has loaded it.
    in_place_cache: the graph writes the new K/V into the bound cache buffers (present aliases past).
    row_copy: ``cache.move(src, dst)`` copies a slot's K/V rows inside the bound buffers (no graph call).
    device: where the cache lives ("cpu", "cuda").
    """

    multi_row_multi_token: bool
    in_place_cache: bool = True
    row_copy: bool = True
    device: str = "cpu"


@runtime_checkable
class Engine(Protocol):
    manifest: Manifest
    max_seq: int
    vocab_size: int
    eos_token_ids: list[int]
    pad_token_id: int

    @property
    def capabilities(self) -> Capabilities: ...

    @property
    def multi_token(self) -> bool: ...

    def prepare_multi_token(self) -> bool: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache_lens: np.ndarray,
             input_lens: np.ndarray, logit_positions: np.ndarray, first_slot: int = 0) -> np.ndarray: ...

    def prefill(self, chunks: Sequence[Sequence[int]], slots: Sequence[int]) -> np.ndarray: ...

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray: ...
