"""The engine seam: what the scheduler, LLM, speculation, benchmarks and fidelity may ask of an engine.

    open_engine(artifact) ──► the target's engine (graphopt/targets: OrtEngine for ort-cpu, TrtEngine for trt),
                              the one way callers open an artifact
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
import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from graphopt.core.errors import ArtifactError, GraphoptError
from graphopt.core.manifest import Manifest, load_manifest
from graphopt.runtime.config import DEFAULT_MAX_SLOTS


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What one engine call can do.

    multi_row_multi_token: several rows of several tokens on top of a cache in one ``step`` (batched
        speculative verification, batched catch-up). ORT's GroupQueryAttention cannot; an ort-cpu artifact
        with a multi-token graph can, once ``prepare_multi_token`` has loaded it.
    in_place_cache: the graph writes the new K/V into the bound cache buffers (present aliases past).
    row_copy: the cache copies and swaps row ranges between slots in place in the bound buffers, with no graph
        call (``cache.move``, ``cache.copy_rows(src, dst, length)``, ``cache.swap(a, b, length)``: numpy slices
        on the CPU, device copies for a CUDA cache); the prefix cache and slot compaction rely on it.
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

    def prepare_multi_token(self) -> bool: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache_lens: np.ndarray,
             input_lens: np.ndarray, logit_positions: np.ndarray, first_slot: int = 0) -> np.ndarray: ...

    def prefill(self, chunks: Sequence[Sequence[int]], slots: Sequence[int]) -> np.ndarray: ...

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray: ...


def engine_path(target: str) -> str:
    """The engine class (``module:Class``) that runs artifacts of ``target``, as the target declares it."""
    from graphopt.targets import get_target

    try:
        path = get_target(target).engine
    except GraphoptError as exc:
        raise ArtifactError(f"{exc} (the artifact's manifest names it)") from None
    if not path:
        raise ArtifactError(f"no engine runs {target!r} artifacts; build for ort-cpu or trt to run it")
    return path


def open_engine(artifact_dir: str | Path, max_slots: int = DEFAULT_MAX_SLOTS, **options) -> Engine:
    """The engine for an artifact's target (graphopt/targets: OrtEngine for ort-cpu, TrtEngine for trt).

    ``options`` are the engine's own (``max_seq``, ``threads``, ``spinning`` for OrtEngine); each engine
    takes what it understands and refuses what cannot apply.
    """
    target = load_manifest(artifact_dir, verify_hashes=False).target  # the engine verifies the hashes
    module, _, name = engine_path(target).partition(":")
    engine_class = getattr(importlib.import_module(module), name)
    return engine_class(artifact_dir, max_slots=max_slots, **options)
