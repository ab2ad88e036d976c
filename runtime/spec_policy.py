"""When to speculate, and how far: measured call costs and per-request acceptance.

Costs come from timing the engines, not from constants: :class:`CostModel` keeps a running average of
each kind of call by size — ``decode`` (target, one token per row, by batch), ``verify`` (target, one row of
k+1 tokens, by k), ``verify_batch.{k}`` (target, every row of a step in one call of k+1 tokens per row, by
batch: the artifact's multi-token graph; without it verification is one ``verify`` call per speculating row,
since GroupQueryAttention on ort-cpu cannot batch several multi-token rows over a cache), ``draft`` (a draft
step, by batch) — seeded by a short calibration when the LLM starts and updated by every step afterwards.

Per request, :meth:`SpecPolicy.choose_k` picks the draft length k ∈ 0..K that maximises tokens per second at
batch 1 given the request's running acceptance estimate α: a round emits (1 − α^(k+1)) / (1 − α) tokens and
costs (verify(k) + k·draft(1)) · overhead, the measured ratio of real speculative step times to these
per-call predictions. α is measured, never assumed: a request starts from the acceptance measured on
earlier requests, and the very first request measures it with a full-K round. k = 0 (off) when plain decoding is
faster; an off request probes again with k = 1 after ``PROBE_GAP`` tokens. Per step with several rows,
:meth:`SpecPolicy.plan` turns speculation off for the whole batch when the predicted rate of the speculative
step is below that of one batched decode step, taking the acceptance of earlier requests (α = 1 before any)
for rows not measured yet — under load the
verification (per-row calls, or one batched call that pads every row to k+1 tokens) costs more than the
accepted tokens save, and plain batched decoding wins.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence as Seq

from graphopt.runtime.sequence import Sequence
from graphopt.runtime.spec_accept import expected_tokens

log = logging.getLogger(__name__)

SMOOTHING = 0.3  # weight of the newest observation in the running averages
PROBE_GAP = 16  # tokens an "off" request decodes plainly before it tries speculation again


class CostModel:
    """Running average of measured call times (seconds) per (kind, size); estimates between sizes by interpolation."""

    def __init__(self) -> None:
        self.times: dict[str, dict[int, float]] = {}

    def observe(self, kind: str, size: int, seconds: float) -> None:
        table = self.times.setdefault(kind, {})
        old = table.get(size)
        table[size] = seconds if old is None else (1 - SMOOTHING) * old + SMOOTHING * seconds

    def estimate(self, kind: str, size: int) -> float:
        """Measured time for ``size``, else linear in size between (or beyond) the nearest measured sizes."""
        table = self.times.get(kind)
        if not table:
            return 0.0
        if size in table:
            return table[size]
        sizes = sorted(table)
        if len(sizes) == 1:
            return table[sizes[0]] * size / sizes[0] if sizes[0] else table[sizes[0]]
        i = min(max(bisect.bisect_left(sizes, size), 1), len(sizes) - 1)
        lo, hi = sizes[i - 1], sizes[i]
        slope = (table[hi] - table[lo]) / (hi - lo)
        return max(table[lo] + slope * (size - lo), 0.0)

    def known(self) -> bool:
        return "decode" in self.times and "verify" in self.times

    def estimate_verify(self, batch: int, k: int) -> float:
        """One call verifying ``batch`` rows of up to k+1 tokens: ``verify`` at batch 1, else ``verify_batch``
        at the measured draft lengths around k, linear in k between them."""
        if batch == 1:
            return self.estimate("verify", k)
        measured = sorted(int(kind.rsplit(".", 1)[1]) for kind in self.times if kind.startswith("verify_batch."))
        if not measured:
            return 0.0
        lo = max((m for m in measured if m <= k), default=measured[0])
        hi = min((m for m in measured if m >= k), default=measured[-1])
        low, high = (self.estimate(f"verify_batch.{m}", batch) for m in (lo, hi))
        return low if hi == lo else low + (high - low) * (k - lo) / (hi - lo)


def verify_cost_key(batch: int, k: int) -> tuple[str, int]:
    """(kind, size) under which a verification call of ``batch`` rows of k+1 tokens is timed."""
    return ("verify", k) if batch == 1 else (f"verify_batch.{k}", batch)


class SpecPolicy:
    """Draft lengths per request and the per-step on/off decision, from a :class:`CostModel`."""

    def __init__(self, max_k: int, costs: CostModel, adaptive: bool = True, draft_model: bool = True,
                 batched: bool = False) -> None:
        self.max_k = max_k
        self.costs = costs
        self.adaptive = adaptive
        self.draft_model = draft_model  # a draft model steps once per draft; n-gram lookup once per round
        self.batched = batched  # every row of a step verified in one call (the artifact's multi-token graph)
        self.alpha: float | None = None  # acceptance measured over every request so far (running average)
        self.overhead = 1.0  # measured / predicted seconds of speculative steps (running average): what the
        # per-call costs miss (per-row catch-up feeds, rebinding slots, sampling), learned from real steps
        # decode steps by outcome: some rows speculated / off by the batch rule / every request chose k = 0
        self.steps = {"speculating": 0, "off_for_batch": 0, "off_by_requests": 0}

    def round_cost(self, k: int, batch: int = 1) -> float:
        """Predicted seconds for one row's round of k drafts when ``batch`` rows speculate together."""
        draft = self.costs.estimate("draft", batch) / batch if batch else 0.0
        return (self.costs.estimate("verify", k) + self._draft_steps(k) * draft) * self.overhead

    def step_seconds(self, ks: Seq[int]) -> float:
        """Predicted seconds of a decode step speculating ``ks[i]`` drafts for row i (before ``overhead``)."""
        seconds = 0.0
        for depth in range(1, self._draft_steps(max(ks)) + 1):  # draft steps, batched over rows still drafting
            seconds += self.costs.estimate("draft", sum(1 for k in ks if k >= depth))
        if self.batched and len(ks) > 1:  # one call, every row padded to the longest draft
            return seconds + self.costs.estimate_verify(len(ks), max(ks))
        plain = sum(1 for k in ks if not k)  # per-row verification, then one batched decode of the rest
        seconds += sum(self.costs.estimate("verify", k) for k in ks if k)
        return seconds + (self.costs.estimate("decode", plain) if plain else 0.0)

    def observe_step(self, ks: Seq[int], seconds: float) -> None:
        """Learn ``overhead`` from a speculative step that took ``seconds``."""
        predicted = self.step_seconds(ks) if any(ks) and self.costs.known() else 0.0
        if predicted > 0:
            self.overhead = (1 - SMOOTHING) * self.overhead + SMOOTHING * seconds / predicted

    def _draft_steps(self, k: int) -> int:
        return k if self.draft_model else 1  # the catch-up feed yields d_1, then one step per further draft

    def choose_k(self, alpha: float, limit: int) -> int:
        """The k ≤ ``limit`` with the best predicted tokens per second; 0 when plain decoding is faster."""
        if not self.adaptive or not self.costs.known():
            return min(self.max_k, limit)
        best_k, best_rate = 0, 1.0 / max(self.costs.estimate("decode", 1), 1e-9)
        for k in range(1, min(self.max_k, limit) + 1):
            rate = expected_tokens(alpha, k) / max(self.round_cost(k), 1e-9)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def request_k(self, seq: Sequence) -> int:
        """This request's draft length for its next round (0: decode plainly this step)."""
        params, spec = seq.params, seq.spec
        limit = params.max_new_tokens - len(seq.output_ids) - 1  # the round's extra token must still fit
        if params.penalised or limit < 1:
            return 0  # penalties depend on each accepted token: speculation would change the distribution
        if len(seq.output_ids) < spec.resume_at:
            return 0
        alpha = spec.alpha if spec.alpha is not None else self.alpha
        if alpha is None or (spec.resume_at and spec.k == 0):  # measure: full K the first time, then k = 1 probes
            spec.k = min(self.max_k if alpha is None else 1, limit)
            return spec.k
        spec.k = self.choose_k(alpha, limit)
        if spec.k == 0:
            spec.resume_at = len(seq.output_ids) + PROBE_GAP
        return spec.k

    def plan(self, seqs: Seq[Sequence]) -> list[int]:
        """k per row for one decode step: each request's own choice, or all 0 when batched decoding wins."""
        ks = [self.request_k(seq) for seq in seqs]
        if not any(ks):
            self.steps["off_by_requests"] += 1
            return ks
        if self.adaptive and len(ks) > 1 and self.costs.known() and not self._batch_wins(seqs, ks):
            self.steps["off_for_batch"] += 1
            return [0] * len(ks)
        self.steps["speculating"] += 1
        return ks

    def _batch_wins(self, seqs: Seq[Sequence], ks: list[int]) -> bool:
        """True when the speculative step's predicted tokens/s beats one plain batched decode of every row."""
        spec_rows = [(seq, k) for seq, k in zip(seqs, ks) if k]
        seconds = self.step_seconds(ks) * self.overhead
        prior = 1.0 if self.alpha is None else self.alpha  # rows not measured yet: what earlier requests got
        tokens = len(ks) - len(spec_rows) + sum(expected_tokens(prior if s.spec.alpha is None else s.spec.alpha, k)
                                                for s, k in spec_rows)
        return tokens / max(seconds, 1e-9) > len(ks) / max(self.costs.estimate("decode", len(ks)), 1e-9)

    def record(self, seq: Sequence, betas: Seq[float], accepted: int) -> None:
        """Fold one round's outcome into the request's statistics and running α."""
        spec = seq.spec
        spec.rounds += 1
        spec.proposed += len(betas)
        spec.accepted += accepted
        spec.beta_sum += sum(betas)
        spec.beta_count += len(betas)
        observed = sum(betas) / len(betas) if betas else 0.0
        spec.alpha = observed if spec.alpha is None else (1 - SMOOTHING) * spec.alpha + SMOOTHING * observed
        self.alpha = observed if self.alpha is None else (1 - SMOOTHING) * self.alpha + SMOOTHING * observed
