"""Timing to a stated precision, without a model: bootstrap intervals of a median, the stop rule, and the
interleaved rounds driven by fake runners whose speeds are drawn from known distributions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from graphopt.evaluate.compare_measure import interleaved_rounds, summarise
from graphopt.evaluate.intervals import Interval, StopRule, median_interval


def test_interval_is_deterministic_and_holds_the_median() -> None:
    samples = list(np.random.default_rng(1).normal(1.0, 0.05, 15))
    first, again = median_interval(samples), median_interval(samples)
    assert first == again and first.rounds == 15
    assert first.low <= first.median <= first.high and first.median == pytest.approx(np.median(samples))
    assert median_interval([2.0] * 7) == Interval(2.0, 2.0, 2.0, 7)


def test_interval_covers_the_true_median_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(2)
    trials = [median_interval(list(rng.lognormal(0.0, 0.1, 12))) for _ in range(300)]
    coverage = np.mean([t.low <= 1.0 <= t.high for t in trials])  # the lognormal(0, σ) median is exactly 1
    assert 0.90 <= coverage <= 0.995, coverage
    wider = median_interval(list(rng.lognormal(0.0, 0.2, 12)))
    assert wider.half_width > np.median([t.half_width for t in trials])  # twice the noise, a wider interval


@pytest.mark.parametrize("rounds,elapsed,half,expected", [
    (4, 1.0, 0.001, None),           # under min_rounds: keep going even when precise
    (5, 1.0, 0.02, "precision"),
    (5, 1.0, 0.05, None),            # not precise yet, time left
    (9, 100.0, 0.05, "time cap"),
    (10, 1.0, 0.05, "max rounds"),
])
def test_stop_rule(rounds: int, elapsed: float, half: float, expected: str | None) -> None:
    rule = StopRule(precision=0.03, min_rounds=5, max_rounds=10, time_cap_s=60.0)
    interval = Interval(1.0, 1.0 - half, 1.0 + half, rounds)
    assert rule.reason([interval, Interval(1.0, 1.0, 1.0, rounds)], rounds, elapsed) == expected


def fake_runner(decode: float, noise: float, seed: int, calls: list[str], name: str):
    rng = np.random.default_rng(seed)

    def run() -> dict[str, float]:
        calls.append(name)
        factor = float(rng.lognormal(0.0, noise))
        return {"ttft_ms": 100.0 / factor, "decode_tokens_per_s": decode * factor,
                "batch_tokens_per_s": 4 * decode * factor}
    return run


def test_rounds_alternate_and_stop_once_precise() -> None:
    calls: list[str] = []
    runners = {"ref": fake_runner(100.0, 0.002, 1, calls, "ref"), "new": fake_runner(75.0, 0.002, 2, calls, "new")}
    samples, stopped, _ = interleaved_rounds(runners, StopRule(precision=0.03, min_rounds=5))
    assert stopped == "precision" and len(samples["ref"]) == len(samples["new"]) == 5
    assert calls[:6] == ["ref", "new", "new", "ref", "ref", "new"]  # A B, B A, A B, …
    result = summarise(samples, stopped, 1.0, StopRule())
    new = result["recipes"]["new"]
    low, high = new["relative_interval"]["decode"]
    assert low <= new["relative"]["decode"] <= high and new["relative"]["decode"] == pytest.approx(0.75, rel=0.02)
    assert result["recipes"]["ref"]["relative"] == {"decode": 1.0, "batch": 1.0, "ttft": 1.0}
    assert result["timing"]["rounds"] == 5 and result["timing"]["short"] is False


def test_noisy_rounds_stop_at_the_cap_and_say_so() -> None:
    calls: list[str] = []
    runners = {"ref": fake_runner(100.0, 0.3, 3, calls, "ref"), "new": fake_runner(100.0, 0.3, 4, calls, "new")}
    ticks = itertools.count()
    rule = StopRule(precision=0.01, min_rounds=5, max_rounds=100, time_cap_s=8.0)
    samples, stopped, seconds = interleaved_rounds(runners, rule, clock=lambda: float(next(ticks)))
    assert stopped == "time cap" and seconds >= 8.0 and len(samples["ref"]) < 100
    result = summarise(samples, stopped, seconds, rule)
    assert result["timing"]["short"] is True and result["timing"]["widest_half_width"] > 0.01
