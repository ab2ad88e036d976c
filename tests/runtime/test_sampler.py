"""Sampler: greedy, temperature, top-k/p, min-p, penalties, logprobs, per-request seeds, validation. Deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.penalties import apply_penalties, token_logprobs
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from graphopt.runtime.sampler import (MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, MIN_TEMPERATURE, Sampler,
                                      SamplingParams, filtered_probs, sample, sample_rows)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _kept(top_k: int, top_p: float, logits: np.ndarray | None = None) -> dict[int, float]:
    logits = np.log(PROBS)[None, :] if logits is None else logits
    ids, probs = filtered_probs(logits, np.ones(1), np.array([top_k]), np.array([top_p]))
    return {int(i): float(p) for i, p in zip(ids[0], probs[0]) if p > 0}


def test_greedy_is_argmax_whatever_top_k_or_top_p() -> None:
    logits = np.random.default_rng(0).standard_normal((5, 100)).astype(np.float32)
    params = [SamplingParams(), SamplingParams(top_k=3), SamplingParams(top_p=0.1)]
    tokens = Sampler(params).sample(logits, [0, 1, 2, 0, 1])
    assert tokens.tolist() == np.argmax(logits, axis=1).tolist()


def test_top_p_keeps_the_smallest_nucleus() -> None:
    assert _kept(0, 0.5) == pytest.approx({0: 1.0})
    assert _kept(0, 0.75) == pytest.approx({0: 0.625, 1: 0.375})
    assert set(_kept(0, 0.85)) == {0, 1, 2}
    assert set(_kept(0, 1.0)) == {0, 1, 2, 3}


def test_top_k_then_top_p() -> None:
    assert _kept(2, 1.0) == pytest.approx({0: 0.625, 1: 0.375})
    assert _kept(3, 0.9) == pytest.approx({0: 0.5 / 0.95, 1: 0.3 / 0.95, 2: 0.15 / 0.95})
    assert _kept(2, 0.6) == pytest.approx({0: 1.0})  # top-p measured within the top-k mass


def test_wide_nucleus_is_exact_beyond_the_candidate_slice() -> None:
    logits = np.random.default_rng(1).standard_normal((3, 5000)).astype(np.float32) * 0.1  # flat: big nucleus
    ids, probs = filtered_probs(logits, np.ones(3), np.zeros(3, np.int64), np.full(3, 0.9))
    for row in range(3):
        full = np.exp(logits[row].astype(np.float64))
        full /= full.sum()
        order = np.argsort(-full)
        size = int(np.searchsorted(np.cumsum(full[order]), 0.9)) + 1
        assert set(ids[row][probs[row] > 0].tolist()) == set(order[:size].tolist())
        assert size > 256


def test_sampling_follows_the_distribution() -> None:
    logits = np.tile(np.log(PROBS), (20000, 1))
    tokens = sample(logits, SamplingParams(temperature=1.0, seed=0))
    counts = np.bincount(tokens, minlength=4) / len(tokens)
    np.testing.assert_allclose(counts, PROBS, atol=0.015)
    hot = sample(np.tile(np.log(PROBS), (4000, 1)), SamplingParams(temperature=1.0, top_k=1, seed=0))
    assert (hot == 0).all()


def test_seed_reproducible_and_independent_of_batch() -> None:
    logits = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11)

    def run(params: list[SamplingParams], rows: list[int]) -> list[list[int]]:
        sampler = Sampler(params)
        return [sampler.sample(logits[rows], list(range(len(rows)))).tolist() for _ in range(20)]

    alone = [step[0] for step in run([seeded], [1])]
    batched = run([SamplingParams(temperature=0.7), seeded, SamplingParams()], [0, 1, 2])
    assert [step[1] for step in batched] == alone
    assert run([seeded], [1]) == run([seeded], [1])
    assert len(set(alone)) > 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature=-0.1 is invalid; use >= 0"),
        ({"top_p": 0.0}, r"top_p=0.0 is invalid; use in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 is invalid; use in \(0, 1\]"),
        ({"top_k": -1}, "top_k=-1 is invalid; use an integer >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid; use an integer >= 1"),
        ({"seed": -3}, "seed=-3 is invalid"),
        ({"temperature": None}, "temperature=None is invalid"),
        ({"stop_token_ids": ["eos"]}, "stop_token_ids=.* use a list of token ids"),
        ({"min_p": 1.5}, r"min_p=1.5 is invalid; use in \[0, 1\]"),
        ({"repetition_penalty": 0}, r"repetition_penalty=0 is invalid; use in \[0.01, 100\]"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty=1e-300 is invalid"),
        ({"repetition_penalty": 1e300}, "repetition_penalty=1e\\+300 is invalid"),
        ({"presence_penalty": 2.5}, r"presence_penalty=2.5 is invalid; use in \[-2, 2\]"),
        ({"frequency_penalty": -3}, "frequency_penalty=-3 is invalid"),
        ({"stop": ["ok", ""]}, "stop=.* non-empty strings"),
        ({"stop": 5}, "stop=5 is invalid"),
        ({"logprobs": 21}, "logprobs=21 is invalid; use None or an integer in 0..20"),
    ],
)
def test_invalid_params_name_field_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(RuntimeInputError, match=message):
        SamplingParams(**kwargs)


def test_params_are_frozen_and_normalised() -> None:
    params = SamplingParams(max_new_tokens=4, stop_token_ids=[3, 4], stop="END")
    assert params.stop_token_ids == (3, 4) and params.greedy and params.stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and not params.penalised
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]


def test_min_p_keeps_tokens_near_the_best() -> None:
    logits = np.log(PROBS)[None, :]
    ids, probs = filtered_probs(logits, np.ones(1), np.zeros(1, np.int64), np.ones(1), np.array([0.5]))
    assert {int(i): float(p) for i, p in zip(ids[0], probs[0]) if p > 0} == pytest.approx({0: 0.625, 1: 0.375})
    ids, probs = filtered_probs(logits, np.ones(1), np.zeros(1, np.int64), np.full(1, 0.6), np.array([0.05]))
    assert {int(i) for i, p in zip(ids[0], probs[0]) if p > 0} == {0, 1}  # top-p first, then min-p
    flat = np.random.default_rng(3).standard_normal((2, 3000)).astype(np.float32) * 0.05  # min-p set > 256
    ids, probs = filtered_probs(flat, np.ones(2), np.zeros(2, np.int64), np.ones(2), np.full(2, 0.9))
    for row in range(2):
        p = np.exp(flat[row].astype(np.float64))
        assert set(ids[row][probs[row] > 0].tolist()) == set(np.flatnonzero(p >= 0.9 * p.max()).tolist())
    tokens = sample(np.tile(np.log(PROBS), (2000, 1)), SamplingParams(temperature=1.0, min_p=0.5, seed=1))
    assert set(tokens.tolist()) == {0, 1}


def _dense_penalties(logits: np.ndarray, prompt: list[int], output: list[int], params: SamplingParams) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    for token in set(prompt) | set(output):
        r = params.repetition_penalty
        out[token] = out[token] / r if out[token] > 0 else out[token] * r
    for token in set(output):
        out[token] -= params.presence_penalty + params.frequency_penalty * output.count(token)
    return out


def test_penalties_match_a_dense_reference_and_leave_other_rows() -> None:
    logits = np.random.default_rng(4).standard_normal((3, 20)).astype(np.float32)
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25), SamplingParams(),
              SamplingParams(frequency_penalty=-1.0)]
    history = [([1, 2, 2, 3], [3, 3, 5]), ([1, 2], [4]), ([7], [8, 8, 8, 9])]
    out = apply_penalties(logits, [0, 2], params, history)
    for row in (0, 2):
        np.testing.assert_allclose(out[row], _dense_penalties(logits[row], *history[row], params[row]), rtol=1e-6)
    np.testing.assert_array_equal(out[1], logits[1])
    before = logits.copy()
    greedy = SamplingParams(repetition_penalty=100.0)
    top = int(np.argmax(logits[0]))
    tokens = sample_rows(logits, [greedy], [np.random.default_rng()], history=[([top], [])])
    assert tokens[0] != top and tokens[0] == np.argsort(-logits[0])[1]  # the repeated best token is pushed down
    np.testing.assert_array_equal(logits, before)


def test_logprobs_are_the_raw_log_softmax() -> None:
    logits = np.random.default_rng(5).standard_normal((2, 50)).astype(np.float32)
    result = token_logprobs(logits, np.array([3, 7]), [0, 4])
    reference = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True))
    assert result[0].token_id == 3 and result[0].logprob == pytest.approx(reference[0, 3]) and result[0].top == ()
    best = np.argsort(-reference[1])[:4]
    assert [i for i, _ in result[1].top] == best.tolist()
    assert [lp for _, lp in result[1].top] == pytest.approx(reference[1, best].tolist())


def test_a_temperature_float32_cannot_invert_is_greedy() -> None:
    logits = np.random.default_rng(3).standard_normal((4, 50)).astype(np.float32)
    for temperature in (3e-39, 1e-300, MIN_TEMPERATURE / 2):
        params = SamplingParams(temperature=temperature, seed=1)
        assert params.greedy and sample(logits, params).tolist() == np.argmax(logits, axis=1).tolist()
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy


_TEMPERATURES = st.one_of(st.sampled_from([MIN_TEMPERATURE, 1e-4, 1e-38, 5e-324, 2.0, 1e30, 1e300]),
                          st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_subnormal=True))
_PARAMS = st.builds(
    SamplingParams, temperature=_TEMPERATURES, top_k=st.integers(0, 80),
    top_p=st.one_of(st.just(1e-300), st.floats(min_value=1e-300, max_value=1.0, exclude_min=False)),
    min_p=st.floats(0, 1), repetition_penalty=st.floats(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
    presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2), seed=st.integers(0, 2**63 - 1))
_LOGITS = hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 64)),
                     elements=st.floats(-3e4, 3e4, width=32))


@settings(max_examples=400, deadline=None)
@given(_LOGITS, _PARAMS, st.data())
def test_extreme_but_valid_params_give_a_real_distribution(logits: np.ndarray, params: SamplingParams,
                                                           data) -> None:
    rows, vocab = logits.shape
    history = [(data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8)),
                data.draw(st.lists(st.integers(0, vocab - 1), max_size=8))) for _ in range(rows)]
    penalised = apply_penalties(logits, list(range(rows)), [params] * rows, history)
    assert np.all(np.isfinite(penalised))
    if not params.greedy:
        filters = [np.full(rows, value) for value in (params.top_k, params.top_p, params.min_p)]
        for top_k, top_p, min_p in ((None, None, None), tuple(filters)):
            _, probs = filtered_probs(penalised, np.full(rows, params.temperature), top_k, top_p, min_p)
            assert np.all(np.isfinite(probs)) and np.all(probs >= 0)
            assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    tokens = Sampler([params]).sample(logits, [0] * rows, history)
    assert tokens.dtype == np.int64 and np.all((tokens >= 0) & (tokens < vocab))
