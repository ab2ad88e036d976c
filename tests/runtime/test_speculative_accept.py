"""Speculative decoding without a model: acceptance math (hand-worked), n-gram lookup, cost policy, scheduling."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from graphopt.core.errors import ArtifactError, RuntimeInputError

from graphopt.runtime.kv_cache import SlotCache
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.scheduler import Scheduler, SchedulerConfig, StepKind
from graphopt.runtime.sequence import Sequence
from graphopt.runtime.spec_accept import (accept_greedy, accept_sampled, dense_probs, draw, expected_tokens,
                                          leviathan_speedup)
from graphopt.runtime.spec_policy import CostModel, SpecPolicy
from graphopt.runtime.spec_propose import ngram_lookup
from graphopt.runtime.speculative import SpecConfig, check_draft


def chi_square_pvalue(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson goodness of fit; cells expecting < 5 are pooled into one."""
    expected = expected_probs * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    if (observed[expected == 0] > 0).any():
        return 0.0  # an outcome the expected distribution calls impossible
    keep = expected > 0
    stat = float((((observed - expected) ** 2)[keep] / expected[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# ---- greedy -------------------------------------------------------------------------------------------------
def test_greedy_keeps_the_matching_prefix_and_adds_the_target_token() -> None:
    got = accept_greedy([5, 7, 9], [5, 7, 3, 4])
    assert (got.tokens, got.num_accepted, got.num_proposed, got.betas) == ([5, 7, 3], 2, 3, (1.0, 1.0, 0.0))
    every = accept_greedy([1, 2], [1, 2, 8])
    assert (every.tokens, every.num_accepted) == ([1, 2, 8], 2)  # all kept: the bonus token from position k+1
    none = accept_greedy([4, 1], [6, 1, 0])
    assert (none.tokens, none.num_accepted, none.betas) == ([6], 0, (0.0, 1.0))


# ---- rejection sampling, hand-worked ------------------------------------------------------------------------
P = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
Q = np.array([[0.25, 0.5, 0.25]])


def test_sampled_accepts_with_probability_p_over_q() -> None:
    # d = 1: p(d)/q(d) = 0.3/0.5 = 0.6; u = 0.5 < 0.6 accepts, then the bonus draws from P[1] with u = 0.95 -> 2
    got = accept_sampled([1], Q, P, [0.5, 0.95])
    assert (got.tokens, got.num_accepted) == ([1, 2], 1)
    assert got.betas == pytest.approx((0.75,))  # Σ min(p, q) = 0.25 + 0.3 + 0.2


def test_sampled_rejection_draws_from_the_residual() -> None:
    # u = 0.7 > 0.6 rejects; max(0, p - q) = [0.25, 0, 0]: the replacement is token 0 whatever the last uniform
    for last in (0.0, 0.5, 0.999):
        got = accept_sampled([1], Q, P, [0.7, last])
        assert (got.tokens, got.num_accepted, got.num_proposed) == ([0], 0, 1)


def test_point_mass_draft_accepts_with_probability_p() -> None:
    p = np.array([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    assert accept_sampled([2], None, p, [0.65, 0.0]).tokens == [2, 0]  # 0.65 < p(2) = 0.7: accepted, bonus 0
    # 0.8 rejects; the residual is p without token 2, [0.1, 0.2] (cdf 0.1, 0.3): u = 0.2 -> 0.06 -> token 0,
    # u = 0.5 -> 0.15 -> token 1
    assert accept_sampled([2], None, p, [0.8, 0.2]).tokens == [0]
    assert accept_sampled([2], None, p, [0.8, 0.5]).tokens == [1]
    assert accept_sampled([2], None, p, [0.8, 0.5]).betas == pytest.approx((0.7,))


def test_draw_and_dense_probs() -> None:
    assert [draw(np.array([0.2, 0.0, 0.8]), u) for u in (0.0, 0.19, 0.2, 0.99)] == [0, 0, 2, 2]
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    np.testing.assert_allclose(dense_probs(logits, SamplingParams(temperature=1.0)), [[0.5, 0.3, 0.15, 0.05]],
                               atol=1e-6)
    np.testing.assert_allclose(dense_probs(logits, SamplingParams(temperature=1.0, top_k=2)),
                               [[0.625, 0.375, 0, 0]], atol=1e-6)


def test_leviathan_formula() -> None:
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)  # (1 - 0.5^3) / 0.5
    assert leviathan_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)
    assert expected_tokens(1.0, 4) == 5.0


@pytest.mark.parametrize("broken", [False, True])
@pytest.mark.parametrize("point_mass", [False, True])
def test_rejection_sampling_reproduces_the_target_distribution(broken: bool, point_mass: bool) -> None:
    """Chi-square over 20k rounds: emitted tokens follow p; accepting every draft (the bug) follows q and fails.

    ``point_mass``: the draft always proposes tokens 3, 1 (n-gram lookup), q = None."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=3)
    q = rng.dirichlet(np.ones(6), size=2)
    first = np.zeros(6)
    for _ in range(20_000):
        drafts = [3, 1] if point_mass else [draw(q[j], rng.random()) for j in range(2)]
        tokens = drafts if broken else accept_sampled(drafts, None if point_mass else q, p, rng.random(3)).tokens
        first[tokens[0]] += 1
    pvalue = chi_square_pvalue(first, p[0])
    assert (pvalue < 1e-6) if broken else (pvalue > 1e-3)


# ---- n-gram lookup ------------------------------------------------------------------------------------------
def test_ngram_lookup() -> None:
    assert ngram_lookup([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]  # no earlier [4, 1, 2]; [1, 2] at 0
    assert ngram_lookup([1, 2, 9, 1, 2, 8, 1, 2], 1) == [8]  # the latest earlier match wins
    assert ngram_lookup([7, 5, 6, 7], 4) == [5, 6, 7]  # 1-gram [7]; fewer than k tokens follow it
    assert ngram_lookup([1, 2, 3], 2) == []
    assert ngram_lookup([3, 4, 3], 2, min_n=2) == []


# ---- costs and policy ---------------------------------------------------------------------------------------
def _costs(decode: dict[int, float], verify: float, draft: float) -> CostModel:
    costs = CostModel()
    for batch, seconds in decode.items():
        costs.observe("decode", batch, seconds)
        costs.observe("draft", batch, draft * (1 + 0.1 * batch))
    for k in range(1, 6):
        costs.observe("verify", k, verify * (1 + 0.05 * k))
    return costs


def test_cost_model_interpolates() -> None:
    costs = _costs({1: 0.010, 8: 0.024}, 0.011, 0.002)
    assert costs.estimate("decode", 4) == pytest.approx(0.010 + 3 * 0.014 / 7)
    assert costs.estimate("decode", 16) == pytest.approx(0.010 + 15 * 0.014 / 7)
    costs.observe("decode", 1, 0.020)
    assert costs.estimate("decode", 1) == pytest.approx(0.7 * 0.010 + 0.3 * 0.020)


def _seq(output: int = 1, **params) -> Sequence:
    seq = Sequence([5, 6, 7], SamplingParams(max_new_tokens=64, **params))
    seq.output_ids = [9] * output
    return seq


def test_policy_k_follows_acceptance_and_cost() -> None:
    cheap = SpecPolicy(5, _costs({1: 0.010, 8: 0.024}, 0.011, 0.002))
    assert cheap.choose_k(0.9, 5) >= 3 and cheap.choose_k(0.05, 5) == 0
    assert cheap.choose_k(0.9, 2) == 2  # capped by what the request may still generate
    expensive_draft = SpecPolicy(5, _costs({1: 0.010, 8: 0.024}, 0.011, 0.010))
    assert expensive_draft.choose_k(0.6, 5) == 0
    assert SpecPolicy(4, CostModel(), adaptive=False).choose_k(0.0, 9) == 4
    assert cheap.request_k(_seq(repetition_penalty=1.2)) == 0 and cheap.request_k(_seq(output=63)) == 0


def test_policy_turns_speculation_off_for_a_large_batch() -> None:
    policy = SpecPolicy(4, _costs({1: 0.010, 8: 0.016}, 0.011, 0.002))
    one = [_seq()]
    assert policy.plan(one) == [4]  # nothing measured yet: the first round measures α with the full K
    many = [_seq() for _ in range(8)]
    # even at α = 1, 8 verification calls (8 x 5 tokens in 0.12 s) lose to one batched decode (8 in 0.016 s)
    assert policy.plan(many) == [0] * 8 and policy.steps["off_for_batch"] == 1
    assert policy.plan(many[:2]) != [0, 0]  # two rows: speculation still pays


def test_batched_verification_cost_decides_for_a_large_batch() -> None:
    """With a multi-token graph a step is one verification call of every row, timed by batch and k."""
    costs = _costs({1: 0.010, 8: 0.016}, 0.011, 0.002)
    for batch, scale in ((2, 1.0), (8, 2.0)):  # measured at k = 1 and 4; k = 2, 3 in between, linear in k
        costs.observe("verify_batch.1", batch, 0.012 * scale)
        costs.observe("verify_batch.4", batch, 0.018 * scale)
    assert costs.estimate_verify(8, 2) == pytest.approx(0.024 + (0.036 - 0.024) / 3)
    assert costs.estimate_verify(1, 3) == costs.estimate("verify", 3)  # one row: the GQA graph's own timing
    policy = SpecPolicy(4, costs, batched=True)
    ks = [4, 0, 4, 4, 4, 4, 4, 4]
    assert policy.step_seconds(ks) == pytest.approx(0.036 + 4 * 0.002 * 1.7)  # one call + 4 draft steps of 7 rows
    many = [_seq() for _ in range(8)]
    assert policy.plan(many) == [4] * 8  # at α = 1, 40 tokens in 0.050 s beat 8 in 0.016 s
    slow = SpecPolicy(4, costs, batched=True)
    for batch in (2, 8):
        costs.observe("verify_batch.4", batch, 0.4)  # now one batched verification costs more than it saves
        costs.observe("verify_batch.4", batch, 0.4)
    assert slow.plan(many) == [0] * 8 and slow.steps["off_for_batch"] == 1


def test_measured_step_overhead_turns_a_marginal_batch_off() -> None:
    policy = SpecPolicy(4, _costs({1: 0.010, 8: 0.016}, 0.011, 0.002))
    pair = [_seq(), _seq()]
    ks = policy.plan(pair)
    assert ks == [4, 4]
    predicted = policy.step_seconds(ks)
    assert predicted == pytest.approx(2 * 0.011 * 1.2 + 4 * 0.002 * 1.2)  # 2 verify calls + 4 batched draft steps
    for _ in range(10):  # real steps take twice what the per-call costs add up to
        policy.observe_step(ks, 2 * predicted)
    assert policy.overhead == pytest.approx(2.0, rel=0.05)
    assert policy.plan(pair) == [0, 0] and policy.steps["off_for_batch"] == 1


def test_new_requests_start_from_the_measured_acceptance() -> None:
    policy = SpecPolicy(5, _costs({1: 0.010, 8: 0.016}, 0.011, 0.002))
    first = _seq()
    assert policy.request_k(first) == 5
    policy.record(first, [0.0, 0.0, 0.0, 0.0, 0.0], 0)
    assert policy.alpha == 0.0 and policy.request_k(_seq()) == 0  # a new request inherits α = 0: off
    policy.record(first, [1.0] * 5, 5)
    assert policy.alpha == pytest.approx(0.3) and first.spec.alpha == pytest.approx(0.3)


def test_off_request_probes_again_later() -> None:
    policy = SpecPolicy(4, _costs({1: 0.010, 8: 0.024}, 0.011, 0.002))
    seq = _seq()
    seq.spec.alpha = 0.0
    assert policy.request_k(seq) == 0 and seq.spec.resume_at == 1 + 16
    assert policy.request_k(seq) == 0
    seq.output_ids += [9] * 16
    assert policy.request_k(seq) == 1  # one probe round re-measures α ...
    assert policy.request_k(seq) == 0 and seq.spec.resume_at == 17 + 16  # ... and a low α turns it off again


# ---- scheduler ----------------------------------------------------------------------------------------------
def test_scheduler_accounts_k_plus_one_tokens_and_mirrors_the_draft_cache() -> None:
    cache, draft = SlotCache(1, 1, 2, 4, 64), SlotCache(1, 1, 2, 4, 64)
    sched = Scheduler(cache, SchedulerConfig(max_batch_tokens=10), planner=lambda seqs: [4] * len(seqs),
                      mirrors=(draft,))
    seqs = [Sequence([5, 6], SamplingParams(max_new_tokens=8)) for _ in range(3)]
    for seq in seqs:
        sched.add(seq)
    step = sched.schedule()
    assert step.kind is StepKind.PREFILL and draft.num_active == 3
    sched.complete(step)
    for seq in seqs:
        seq.output_ids.append(9)
    step = sched.schedule()
    assert step.kind is StepKind.DECODE and step.speculating
    assert step.num_tokens == 10 and sorted(step.num_speculative) == [2, 2, 3]  # cut largest first to fit
    draft.lens[:3] = [3, 4, 5]
    sched.complete(step, {0: 2})
    assert seqs[0].num_cached == 2 + 1 + 2 and seqs[1].num_cached == 3
    sched.release([seqs[0]])  # slot 2 moves into slot 0 in both caches
    assert draft.num_active == 2 and draft.lens[:2].tolist() == [5, 4] and seqs[2].slot == 0


# ---- configuration and draft compatibility ------------------------------------------------------------------
def _tokenizer(root: Path, vocab: dict[str, int]) -> Path:
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}, "added_tokens": []}))
    return root


def test_draft_must_share_the_vocabulary(tmp_path: Path) -> None:
    a, b = _tokenizer(tmp_path / "a", {"x": 0, "y": 1}), _tokenizer(tmp_path / "b", {"x": 1, "y": 0})
    same = _tokenizer(tmp_path / "c", {"x": 0, "y": 1})
    def engine(vocab: int, max_seq: int = 64) -> SimpleNamespace:
        return SimpleNamespace(vocab_size=vocab, max_seq=max_seq)

    check_draft(engine(2), engine(2), a, same)
    with pytest.raises(ArtifactError, match="vocabulary of 3 tokens but the target .* has 2; use a draft built"):
        check_draft(engine(2), engine(3), a, same)
    with pytest.raises(ArtifactError, match="different tokenizer from the target"):
        check_draft(engine(2), engine(2), a, b)
    with pytest.raises(ArtifactError, match="holds 32 positions but the target runs with 64; lower --max-seq to 32"):
        check_draft(engine(2), engine(2, 32), a, same)


def test_spec_config_refusals() -> None:
    with pytest.raises(RuntimeInputError, match="exactly one of --draft"):
        SpecConfig(method="draft")
    with pytest.raises(RuntimeInputError, match="exactly one of --draft"):
        SpecConfig(method="ngram", draft=Path("x"))
    with pytest.raises(RuntimeInputError, match="num_speculative_tokens=0 is invalid"):
        SpecConfig(method="ngram", num_speculative_tokens=0)
    with pytest.raises(RuntimeInputError, match="method 'eagle' is unknown"):
        SpecConfig(method="eagle")
