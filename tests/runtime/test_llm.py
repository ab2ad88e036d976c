"""LLM (in-flight batching) and AsyncLLM on a tiny random llama artifact, against a plain greedy loop on the engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from graphopt.core.errors import OverloadedError, RuntimeInputError
from graphopt.runtime.async_llm import AsyncLLM
from graphopt.runtime.engine import OrtEngine
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from serving_artifact import tiny_artifact

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def artifact():
    return tiny_artifact()


@pytest.fixture(scope="module")
def llm(artifact) -> LLM:
    return LLM(artifact, max_slots=16, max_batch_tokens=24, threads=1)


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 96, size=int(rng.integers(1, 60))).tolist() for _ in range(count)]


def _alone(artifact, prompt: list[int], params: SamplingParams) -> list[int]:
    """The reference: one prompt alone, prefill then argmax/decode, no scheduler (``params`` greedy, no stops)."""
    assert params.temperature == 0 and params.ignore_eos
    engine = OrtEngine(artifact, max_slots=1, threads=1)
    slot = engine.cache.allocate()
    tokens = [int(np.argmax(engine.prefill([prompt], [slot])[0]))]
    while len(tokens) < params.max_new_tokens:
        tokens.append(int(np.argmax(engine.decode([tokens[-1]])[0])))
    return tokens


def test_greedy_batch_invariance_with_chunked_prefill(llm: LLM, artifact) -> None:
    prompts = _prompts(16)
    assert max(map(len, prompts)) > 24  # some prompts are prefilled in chunks (max_batch_tokens=24)
    together = llm.generate(prompts, GREEDY)
    for prompt, result in zip(prompts, together):
        assert result.token_ids == _alone(artifact, prompt, GREEDY)
        assert result.finish_reason == "length" and result.prompt_tokens == len(prompt)
    assert llm.engine.cache.num_active == 0 and not llm.has_work


def test_text_and_stop_strings(llm: LLM) -> None:
    (full,) = llm.generate(["w4 w5 w6"], GREEDY)
    words = full.text.split()
    assert words == llm.tokenizer.decode(full.token_ids).split() and len(words) == 12
    stop = f" {words[3]}"
    (cut,) = llm.generate("w4 w5 w6", SamplingParams(max_new_tokens=12, stop=[stop, "never"], ignore_eos=True))
    assert cut.finish_reason == "stop" and cut.text == " " + " ".join(words[:3])
    assert cut.token_ids == full.token_ids[:4]  # the token that completed the stop string is kept in the ids
    seq = llm.add_request("w4 w5 w6", SamplingParams(max_new_tokens=12, stop=[stop], ignore_eos=True))
    deltas = []
    while llm.has_work:
        deltas += [out.text for out in llm.step() if out.request_id == seq.request_id]
    assert "".join(deltas) == cut.text and all(words[3] not in d for d in deltas)


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    (full,) = llm.generate(["w9 w10"], GREEDY)
    stop_id = full.token_ids[2]
    (stopped,) = llm.generate(["w9 w10"], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_id]))
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]


def test_seeded_sampling_is_batch_invariant_and_logprobs(llm: LLM) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, min_p=0.02, seed=3, ignore_eos=True,
                            repetition_penalty=1.2, frequency_penalty=0.3, logprobs=2)
    prompts = _prompts(5, seed=1)
    alone = llm.generate([prompts[2]], params)[0]
    batched = llm.generate(prompts, [SamplingParams(max_new_tokens=6, temperature=1.0)] * 2 + [params] * 3)
    assert batched[2].token_ids == alone.token_ids
    assert [lp.token_id for lp in alone.logprobs] == alone.token_ids
    assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] and lp.logprob <= 0 for lp in alone.logprobs)
    (greedy,) = llm.generate([prompts[0]], SamplingParams(max_new_tokens=4, logprobs=1, ignore_eos=True))
    assert all(lp.top[0][0] == lp.token_id for lp in greedy.logprobs)


def test_abort_frees_the_slot_at_the_next_step(llm: LLM) -> None:
    seq = llm.add_request([5, 6, 7], SamplingParams(max_new_tokens=100, ignore_eos=True))
    llm.step()
    llm.step()
    assert llm.engine.cache.num_active == 1
    assert llm.abort(seq.request_id) is seq and llm.abort(seq.request_id) is None
    assert llm.step() == [] and llm.engine.cache.num_active == 0 and seq.finish_reason == "cancelled"


def test_refusals(artifact) -> None:
    small = LLM(artifact, max_slots=1, max_seq=32, max_queue=1, threads=1)
    with pytest.raises(RuntimeInputError, match="over the context limit 32"):
        small.add_request([5] * 30, SamplingParams(max_new_tokens=4))
    with pytest.raises(RuntimeInputError, match="token ids must be .* in 0..95"):
        small.add_request([5, 500], SamplingParams())
    with pytest.raises(RuntimeInputError, match="over the context limit"):  # the second prompt is refused ...
        small.generate([[5], [6] * 40], SamplingParams(max_new_tokens=2))
    assert not small.has_work and small.engine.cache.num_active == 0  # ... and the first is not left queued
    small.add_request([5], SamplingParams(max_new_tokens=2), request_id="a")
    with pytest.raises(OverloadedError, match="queue is full"):
        small.add_request([5], SamplingParams(max_new_tokens=2))
    small.abort("a")
    small.step()
    results = small.generate([[5], [6], [7]], SamplingParams(max_new_tokens=2, ignore_eos=True))  # > max_queue
    assert [(len(r.token_ids), r.finish_reason) for r in results] == [(2, "length")] * 3


def test_async_streams_interleave_and_cancel(artifact) -> None:
    async def main() -> None:
        llm = LLM(artifact, max_slots=4, threads=1)
        async_llm = AsyncLLM(llm)
        async_llm.start()
        prompts = _prompts(4, seed=2)
        expected = [_alone(artifact, p, GREEDY) for p in prompts]
        results = await asyncio.gather(*(async_llm.generate(p, GREEDY) for p in prompts))
        assert [r.token_ids for r in results] == expected
        stream = await async_llm.stream([5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
        async for out in stream:
            if len(out.seq.output_ids) == 3:
                break
        await stream.aclose()  # leaving the stream early cancels the request
        for _ in range(100):
            if llm.engine.cache.num_active == 0:
                break
            await asyncio.sleep(0.01)
        assert llm.engine.cache.num_active == 0 and async_llm.num_requests == 0
        await async_llm.shutdown()

    asyncio.run(main())


def test_the_readme_python_api(artifact) -> None:
    from graphopt import LLM as PublicLLM, SamplingParams as PublicParams

    assert PublicLLM is LLM and PublicParams is SamplingParams
    llm = PublicLLM(artifact, max_slots=4, threads=1)
    completions = llm.generate(["w4 w5 w6", "w7 w8"], PublicParams(max_new_tokens=4, ignore_eos=True))
    assert [len(c.token_ids) for c in completions] == [4, 4] and all(isinstance(c.text, str) for c in completions)
