"""The prefix cache on a tiny random llama artifact: the same greedy tokens with and without it, over random
multi-turn chats (shared system prompts, diverging turns, evictions forced by few slots, cancellations
mid-prefill), plain and speculative; and a copied prefix equal, bit for bit, to a fresh prefill's K/V."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.runtime.engine import OrtEngine
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.speculative import SpecConfig
from serving_artifact import tiny_artifact
from test_speculative import draft_artifact


@pytest.fixture(scope="module")
def artifact():
    return tiny_artifact()


def _conversations(count: int, seed: int) -> list[list[list[int]]]:
    """Each conversation: its first prompt (one of two system prompts, or none, plus a question), then the
    user turns appended after each answer."""
    rng = np.random.default_rng(seed)
    systems = [rng.integers(4, 96, size=n).tolist() for n in (40, 23)] + [[]]
    return [[systems[int(rng.integers(3))] + rng.integers(4, 96, size=int(rng.integers(1, 12))).tolist()] +
            [rng.integers(4, 96, size=int(rng.integers(1, 8))).tolist() for _ in range(int(rng.integers(0, 3)))]
            for _ in range(count)]


def _chat(llm: LLM, conversations: list[list[list[int]]], concurrent: int = 5) -> dict[tuple[int, int], list[int]]:
    """Run the conversations, ``concurrent`` at once, each turn after the last one's answer. Every seventh
    conversation is cancelled at its first step (mid-prefill when its prompt is chunked). Returns each
    answered turn's greedy tokens."""
    answers: dict[tuple[int, int], list[int]] = {}
    running: dict[str, tuple[int, int, list[int]]] = {}
    todo = list(range(len(conversations)))[::-1]
    while todo or running:
        while todo and len(running) < concurrent:
            conv = todo.pop()
            params = SamplingParams(max_new_tokens=4 + conv % 5, ignore_eos=True)
            running[llm.add_request(conversations[conv][0], params).request_id] = (conv, 0, conversations[conv][0])
        for out in llm.step():
            conv, turn, prompt = running[out.request_id]
            if conv % 7 == 3 and turn == 0:
                llm.abort(out.request_id)
                del running[out.request_id]
            elif out.finished:
                del running[out.request_id]
                answers[conv, turn] = list(out.seq.output_ids)
                if turn + 1 < len(conversations[conv]):
                    nxt = prompt + answers[conv, turn] + conversations[conv][turn + 1]
                    seq = llm.add_request(nxt, out.seq.params)
                    running[seq.request_id] = (conv, turn + 1, nxt)
    return answers


@pytest.mark.parametrize("speculative", [None, "ngram", "draft"])
def test_greedy_tokens_equal_without_the_cache(artifact, speculative) -> None:
    conversations = _conversations(50 if speculative is None else 16, seed=1)
    spec = None if speculative is None else SpecConfig(
        method=speculative, adaptive=False, num_speculative_tokens=3,
        draft=draft_artifact(0.5) if speculative == "draft" else None)
    settings = dict(max_slots=3, max_batch_tokens=16, threads=1, speculative=spec)
    plain = _chat(LLM(artifact, prefix_cache=False, **settings), conversations)
    cached_llm = LLM(artifact, **settings)
    cached = _chat(cached_llm, conversations)
    assert cached == plain
    stats = cached_llm.scheduler.prefix.stats
    assert stats.hits >= 10 and stats.evictions >= 1 and cached_llm.engine.cache.num_active == 0, stats


def test_a_copied_prefix_is_a_fresh_prefill_bit_for_bit(artifact) -> None:
    engine = OrtEngine(artifact, max_slots=3, threads=1)
    prompt = np.random.default_rng(2).integers(4, 96, size=37).tolist()
    slots = [engine.cache.allocate() for _ in range(3)]
    engine.prefill([prompt[:30]], [slots[0]])
    fresh = engine.prefill([prompt], [slots[2]])  # the whole prompt, prefilled afresh
    engine.cache.copy_rows(slots[0], slots[1], 30)
    engine.cache.advance(slots[1], 30)
    for keys, values in zip(engine.cache.keys, engine.cache.values):
        assert np.array_equal(keys[1, :, :30], keys[2, :, :30]) and np.array_equal(values[1, :, :30], values[2, :, :30])
        assert keys[1, :, :30].any()
    reused = engine.prefill([prompt[30:]], [slots[1]])  # the rest, on top of the copied rows
    for keys, values in zip(engine.cache.keys, engine.cache.values):
        np.testing.assert_allclose(keys[1, :, 30:37], keys[2, :, 30:37], atol=1e-5)
        np.testing.assert_allclose(values[1, :, 30:37], values[2, :, 30:37], atol=1e-5)
    np.testing.assert_allclose(reused, fresh, atol=1e-4)
