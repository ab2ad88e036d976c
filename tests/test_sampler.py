"""Sampler: greedy, temperature, top-k, top-p, per-request seeds, parameter validation. Deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.errors import RuntimeInputError
from graphopt.runtime.sampler import Sampler, SamplingParams, filtered_probs, sample

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
    ],
)
def test_invalid_params_name_field_and_range(kwargs: dict, message: str) -> None:
    with pytest.raises(RuntimeInputError, match=message):
        SamplingParams(**kwargs)


def test_params_are_frozen_and_normalised() -> None:
    params = SamplingParams(max_new_tokens=4, stop_token_ids=[3, 4])
    assert params.stop_token_ids == (3, 4) and params.greedy
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]
