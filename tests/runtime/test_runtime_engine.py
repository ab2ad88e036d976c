"""OrtEngine and the LLM loop on a synthetic contract artifact, against a numpy full-sequence reference."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import transformers

from contract_model import ContractModel, build_contract_artifact
from graphopt.core.errors import ArtifactError, RuntimeInputError
from graphopt.runtime.engine import OrtEngine
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from tiny_models import tiny_tokenizer

ATOL = 1e-5
LENGTHS = (3, 5, 7)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ContractModel]:
    directory = tmp_path_factory.mktemp("contract") / "artifact"
    model = build_contract_artifact(directory, eos_token_ids=(31,))
    return str(directory), model


@pytest.fixture
def engine(artifact: tuple[str, ContractModel]) -> OrtEngine:
    return OrtEngine(artifact[0], max_slots=4, max_seq=32, threads=1)


def _prompts(seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 31, size=n).tolist() for n in LENGTHS]


def _last_logits(model: ContractModel, tokens: list[int]) -> np.ndarray:
    return model.reference_logits(tokens)[-1]


def test_prefill_then_decode_matches_reference(engine: OrtEngine, artifact: tuple[str, ContractModel]) -> None:
    model = artifact[1]
    prompts = _prompts()
    slots = [engine.cache.allocate() for _ in prompts]
    logits = engine.prefill(prompts, slots)
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits[row], _last_logits(model, prompt), atol=ATOL)
    assert engine.cache.cache_lens().tolist() == list(LENGTHS)
    rng = np.random.default_rng(2)
    for _ in range(10):
        tokens = rng.integers(0, 31, size=len(prompts))
        logits = engine.decode(tokens)
        for row, token in enumerate(tokens.tolist()):
            prompts[row].append(token)
            np.testing.assert_allclose(logits[row], _last_logits(model, prompts[row]), atol=ATOL)
    assert engine.cache.cache_lens().tolist() == [n + 10 for n in LENGTHS]


def test_cache_is_updated_in_place(engine: OrtEngine, artifact: tuple[str, ContractModel]) -> None:
    model = artifact[1]
    prompts = _prompts()
    keys0 = engine.cache.keys[0]
    pointer = keys0.ctypes.data
    assert not keys0.any()
    engine.prefill(prompts, [engine.cache.allocate() for _ in prompts])
    # ORT wrote into our numpy buffers (the engine never copies present_* back), at the contract's positions
    assert keys0.ctypes.data == pointer
    for row, prompt in enumerate(prompts):
        _, ref_keys, ref_values = model.reference(prompt)
        for layer in range(model.num_layers):
            np.testing.assert_allclose(engine.cache.keys[layer][row, :, : len(prompt)], ref_keys[layer], atol=ATOL)
            np.testing.assert_allclose(engine.cache.values[layer][row, :, : len(prompt)], ref_values[layer], atol=ATOL)
    outputs = {name: value for name, value in zip(engine.session.get_outputs(), engine._binding.get_outputs())}
    present = next(value for node, value in outputs.items() if node.name == "present_key.0")
    assert present.data_ptr() == pointer  # the bound output IS the cache buffer: no copy


def test_prefill_splits_rows_that_have_a_cache(engine: OrtEngine, artifact: tuple[str, ContractModel]) -> None:
    model = artifact[1]
    prompts = _prompts()
    cut = [2, 3, 4]
    slots = [engine.cache.allocate() for _ in prompts]
    engine.prefill([p[:c] for p, c in zip(prompts, cut)], slots)
    with pytest.raises(RuntimeInputError, match="one call each"):
        ids = np.ones((3, 3), np.int64)
        engine.step(ids, ids, engine.cache.cache_lens(), np.full(3, 3, np.int32), np.zeros((3, 1), np.int64))
    logits = engine.prefill([p[c:] for p, c in zip(prompts, cut)], slots)
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits[row], _last_logits(model, prompt), atol=ATOL)
    logits = engine.decode([5, 6, 7])
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits[row], _last_logits(model, prompt + [5 + row]), atol=ATOL)


def test_step_returns_every_requested_position(engine: OrtEngine, artifact: tuple[str, ContractModel]) -> None:
    prompt = _prompts()[2]
    engine.cache.allocate()
    ids = np.array([prompt], np.int64)
    positions = np.arange(len(prompt))[None, :]
    logits = engine.step(ids, positions, np.zeros(1, np.int32), np.array([len(prompt)], np.int32), positions)
    np.testing.assert_allclose(logits[0], artifact[1].reference_logits(prompt), atol=ATOL)


def test_compaction_keeps_other_rows_exact(engine: OrtEngine, artifact: tuple[str, ContractModel]) -> None:
    model = artifact[1]
    prompts = _prompts()
    engine.prefill(prompts, [engine.cache.allocate() for _ in prompts])
    engine.decode([1, 2, 3])
    for row, token in enumerate([1, 2, 3]):
        prompts[row].append(token)
    move = engine.cache.free(0)  # row 0 finished: the last slot (row 2) moves into slot 0
    assert (move.src, move.dst) == (2, 0)
    rows = [2, 1]
    for step in range(4):
        tokens = [10 + step, 20 + step]
        logits = engine.decode(tokens)
        for slot, (row, token) in enumerate(zip(rows, tokens)):
            prompts[row].append(token)
            np.testing.assert_allclose(logits[slot], _last_logits(model, prompts[row]), atol=ATOL)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory, artifact: tuple[str, ContractModel]):
    directory = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(directory, artifact[1].vocab_size)
    return transformers.PreTrainedTokenizerFast.from_pretrained(directory)


def _llm(artifact, tokenizer, **settings) -> LLM:
    return LLM(artifact[0], tokenizer=tokenizer, threads=1, **settings)


def test_llm_greedy_matches_reference(artifact: tuple[str, ContractModel], tokenizer) -> None:
    model = artifact[1]
    prompts = _prompts()
    free_run = [model.reference_greedy(p, 8, {31})[0] for p in prompts]
    stop = free_run[0][2]  # make row 0 stop early, so it leaves the batch and the others are compacted
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(stop,))
    llm = _llm(artifact, tokenizer, max_slots=3)
    results = llm.generate(prompts, params)
    for prompt, result in zip(prompts, results):
        tokens, reason = model.reference_greedy(prompt, 8, {31, stop})
        assert (result.token_ids, result.finish_reason) == (tokens, reason)
        assert result.ttft_s > 0
    assert len(results[0].token_ids) <= 3 and results[0].finish_reason == "stop"
    assert llm.engine.cache.num_active == 0


def test_step_outputs_and_seeded_sampling(artifact: tuple[str, ContractModel], tokenizer) -> None:
    prompts = _prompts()
    params = SamplingParams(max_new_tokens=6, temperature=0.9, top_p=0.9, top_k=10, seed=7)
    llm = _llm(artifact, tokenizer, max_slots=3)
    seqs = [llm.add_request(prompt, params) for prompt in prompts]
    streamed: dict[str, list[int]] = {seq.request_id: [] for seq in seqs}
    finished = []
    while llm.has_work:
        for out in llm.step():
            streamed[out.request_id] += out.token_ids
            finished += [out.request_id] if out.finished else []
    assert sorted(finished) == sorted(streamed)
    again = llm.generate(prompts, params)
    assert [c.token_ids for c in again] == [streamed[seq.request_id] for seq in seqs]
    alone = llm.generate([prompts[1]], params)[0]  # same seed, different batch: same tokens
    assert alone.token_ids == again[1].token_ids


def test_tampered_model_is_refused(tmp_path, artifact: tuple[str, ContractModel]) -> None:
    for damage in ("flip", "truncate"):
        copy = tmp_path / damage
        shutil.copytree(artifact[0], copy)
        data = bytearray((copy / "model.onnx").read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[:-10]
        (copy / "model.onnx").write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match="model.onnx"):
            OrtEngine(copy)


def test_prompt_longer_than_context_is_refused(artifact: tuple[str, ContractModel], tokenizer) -> None:
    small = _llm(artifact, tokenizer, max_slots=2, max_seq=16)
    with pytest.raises(RuntimeInputError, match="over the context limit 16"):
        small.generate([[1] * 10], SamplingParams(max_new_tokens=8))
    full = _llm(artifact, tokenizer, max_slots=2)  # default: the artifact's max_seq (64)
    assert full.max_seq == 64
    with pytest.raises(RuntimeInputError, match="over the context limit 64"):
        full.generate([[1] * 60], SamplingParams(max_new_tokens=5))
    with pytest.raises(RuntimeInputError, match="non-empty list"):
        full.generate([[1, 2], []], SamplingParams(max_new_tokens=2))
    queued = full.generate([[1], [2], [3]], SamplingParams(max_new_tokens=2, ignore_eos=True))  # 3 prompts, 2 slots
    assert [len(c.token_ids) for c in queued] == [2, 2, 2]
    with pytest.raises(RuntimeInputError, match="max_seq=100"):
        OrtEngine(artifact[0], max_seq=100)
    assert full.engine.cache.num_active == 0
