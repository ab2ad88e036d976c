"""Confidence intervals for timing ratios, and the rule that decides when interleaved timing has enough rounds.

compare times its artifacts in rounds: every artifact once per round, the order alternating (A B, B A, …) so
that drift in machine load hits both alike. In round r a recipe's ratio to the reference recipe is

    decode_r = decode tok/s (recipe, round r) / decode tok/s (reference, round r)      above 1 = faster
    batch_r  = batch tok/s  (recipe, round r) / batch tok/s  (reference, round r)
    ttft_r   = TTFT (reference, round r)      / TTFT (recipe, round r)

Each ratio is reported as the median over rounds with a 95% percentile-bootstrap interval of that median
(:data:`RESAMPLES` resamples of the rounds with replacement, a fixed seed so the same samples always give the
same interval). Timing stops when every ratio's interval is within ±``precision`` of its median (relative
half-width), once ``min_rounds`` have run, or when the time cap or ``max_rounds`` is reached first; the result
says which (``stopped``: "precision", "time cap" or "max rounds").
"""

from __future__ import annotations

import dataclasses

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 17


@dataclasses.dataclass(frozen=True)
class Interval:
    """A median and its confidence interval over ``rounds`` samples."""
    median: float
    low: float
    high: float
    rounds: int

    @property
    def half_width(self) -> float:
        """Half the interval's width relative to the median (0.05 = ±5%)."""
        return (self.high - self.low) / 2 / self.median if self.median else float("inf")

    def to_json(self) -> dict[str, float | int]:
        return {"median": round(self.median, 4), "low": round(self.low, 4), "high": round(self.high, 4),
                "rounds": self.rounds}


def median_interval(samples: list[float], confidence: float = CONFIDENCE) -> Interval:
    """Median of ``samples`` with its percentile-bootstrap interval (deterministic: fixed seed)."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("median_interval needs at least one sample")
    rng = np.random.default_rng(SEED)
    picks = rng.integers(0, values.size, size=(RESAMPLES, values.size))
    medians = np.median(values[picks], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return Interval(float(np.median(values)), float(low), float(high), int(values.size))


def round_ratios(reference: dict[str, float], candidate: dict[str, float]) -> dict[str, float]:
    """One round's ratios of ``candidate`` to ``reference`` (above 1 = candidate better)."""
    return {"decode": candidate["decode_tokens_per_s"] / reference["decode_tokens_per_s"],
            "batch": candidate["batch_tokens_per_s"] / reference["batch_tokens_per_s"],
            "ttft": reference["ttft_ms"] / candidate["ttft_ms"]}


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When interleaved timing may stop: see the module docstring."""
    precision: float = 0.03
    min_rounds: int = 5
    max_rounds: int = 30
    time_cap_s: float = 120.0

    def reason(self, intervals: list[Interval], rounds: int, elapsed_s: float) -> str | None:
        """Why to stop after ``rounds`` rounds in ``elapsed_s`` seconds, or None to run another round."""
        if rounds < self.min_rounds:
            return None
        if all(i.half_width <= self.precision for i in intervals):
            return "precision"
        if rounds >= self.max_rounds:
            return "max rounds"
        if elapsed_s >= self.time_cap_s:
            return "time cap"
        return None
