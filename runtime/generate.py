"""Generate for a fixed batch of prompts: one batched prefill, then batched decode steps.

    prefill(all prompts, slots 0..B-1)   logits at each prompt's last token
    loop: sample → emit → free finished slots (the last slot moves into a freed one) → decode(active)

Rows stop at an end token (the artifact's eos_token_ids plus ``stop_token_ids``; the stop token is
kept in ``token_ids``) or after ``max_new_tokens``. :func:`stream` yields tokens as they are made
(for the CLI); :func:`generate` collects them with timings. In-flight admission of new requests is
the scheduler's job, not this module's.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.engine import OrtEngine
from graphopt.runtime.sampler import Sampler, SamplingParams


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token of prompt ``index``; ``finish_reason`` is set on that prompt's last token."""

    index: int
    token_id: int
    finish_reason: str | None = None  # "stop" (end token) or "length" (max_new_tokens)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated tokens only (the stop token included when finish_reason == "stop")
    finish_reason: str
    ttft_ms: float  # from the generate() call to this prompt's first token
    decode_tokens_per_s: float  # tokens after the first / time from the first to the last (0.0 for one token)


def _per_prompt(params: SamplingParams | Sequence[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise RuntimeInputError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
    return list(params)


def check_prompts(engine: OrtEngine, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> None:
    """Refuse what cannot run: no prompts, an empty prompt, bad token ids, a prompt that overflows the context."""
    if not prompts:
        raise RuntimeInputError("no prompts given; pass at least one prompt")
    if len(prompts) > engine.cache.num_free:
        raise RuntimeInputError(
            f"{len(prompts)} prompts but only {engine.cache.num_free} free KV slots; raise max_slots or pass fewer"
        )
    limit, artifact_limit = engine.max_seq, engine.manifest.dims.max_seq
    for index, (prompt, p) in enumerate(zip(prompts, params)):
        if len(prompt) == 0:
            raise RuntimeInputError(f"prompt {index} is empty; pass at least one token")
        ids = np.asarray(prompt)
        if ids.min() < 0 or ids.max() >= engine.vocab_size:
            raise RuntimeInputError(f"prompt {index} has token ids outside 0..{engine.vocab_size - 1}")
        if len(prompt) + p.max_new_tokens > limit:
            raise_hint = f", or raise max_seq (the artifact allows {artifact_limit})" if limit < artifact_limit else ""
            raise RuntimeInputError(
                f"prompt {index} has {len(prompt)} tokens + max_new_tokens {p.max_new_tokens} > context limit "
                f"{limit}; use a shorter prompt or lower --max-new-tokens{raise_hint}"
            )


def _finish_reason(token: int, count: int, stops: frozenset[int], params: SamplingParams) -> str | None:
    if token in stops:
        return "stop"
    if count >= params.max_new_tokens:
        return "length"
    return None


def stream(engine: OrtEngine, prompts: Sequence[Sequence[int]],
           params: SamplingParams | Sequence[SamplingParams]) -> Iterator[TokenEvent]:
    """Yield every generated token as soon as it is sampled. The engine must have no active slots.

    Inputs are checked here, before the first token is asked for.
    """
    plist = _per_prompt(params, len(prompts))
    check_prompts(engine, prompts, plist)
    if engine.cache.num_active:
        raise RuntimeInputError(f"engine has {engine.cache.num_active} active slots; generate needs an idle engine")
    return _run(engine, prompts, plist)


def _run(engine: OrtEngine, prompts: Sequence[Sequence[int]], plist: list[SamplingParams]) -> Iterator[TokenEvent]:
    sampler = Sampler(plist)
    stops = [frozenset(engine.eos_token_ids) | frozenset(p.stop_token_ids) for p in plist]
    slots = [engine.cache.allocate() for _ in prompts]
    try:
        logits = engine.prefill(prompts, slots)
        slot_rows = list(range(len(prompts)))  # slot -> prompt index; slots 0..n-1 are the active ones
        counts = [0] * len(prompts)
        while slot_rows:
            tokens = sampler.sample(logits, slot_rows)
            finished = []
            for slot, (row, token) in enumerate(zip(slot_rows, tokens.tolist())):
                counts[row] += 1
                reason = _finish_reason(token, counts[row], stops[row], plist[row])
                yield TokenEvent(row, token, reason)
                if reason is not None:
                    finished.append(slot)
            tokens = _compact(engine, slot_rows, tokens, finished)
            if slot_rows:
                logits = engine.decode(tokens)
    finally:
        engine.cache.free_all()


def _compact(engine: OrtEngine, slot_rows: list[int], tokens: np.ndarray, finished: list[int]) -> np.ndarray:
    """Free finished slots, highest first, so a moved slot is never one still to be freed."""
    for slot in sorted(finished, reverse=True):
        move = engine.cache.free(slot)
        if move is not None:
            slot_rows[move.dst] = slot_rows[move.src]
            tokens[move.dst] = tokens[move.src]
        slot_rows.pop()
    return tokens[: len(slot_rows)]


def generate(engine: OrtEngine, prompts: Sequence[Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams],
             on_token: Callable[[TokenEvent], None] | None = None) -> list[GenerationResult]:
    """Generate for every prompt (token ids); ``on_token`` sees each token as it is made (streaming)."""
    start = time.perf_counter()
    tokens: list[list[int]] = [[] for _ in prompts]
    first: list[float] = [0.0] * len(prompts)
    last: list[float] = [0.0] * len(prompts)
    reasons: list[str] = [""] * len(prompts)
    for event in stream(engine, prompts, params):
        now = time.perf_counter()
        if not tokens[event.index]:
            first[event.index] = now
        last[event.index] = now
        tokens[event.index].append(event.token_id)
        reasons[event.index] = event.finish_reason or ""
        if on_token is not None:
            on_token(event)
    return [
        GenerationResult(ids, reason, (t0 - start) * 1e3, (len(ids) - 1) / (t1 - t0) if t1 > t0 else 0.0)
        for ids, reason, t0, t1 in zip(tokens, reasons, first, last)
    ]
