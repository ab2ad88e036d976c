"""Speculative acceptance math: pure functions, no model (Leviathan et al. 2023, Chen et al. 2023).

A draft proposes tokens d_1..d_k; the target scores the k+1 positions in one call, giving distributions
p_1..p_{k+1} (p_j predicts the token after d_{j-1}). Greedy acceptance keeps the drafts that equal the
target's argmax; sampled acceptance keeps d_j with probability min(1, p_j(d_j) / q_j(d_j)) and, at the first
rejection, draws a replacement from the residual norm(max(0, p_j − q_j)), which makes every emitted token
distributed exactly as the target's p. Either way a round emits the accepted drafts plus one target token
(the replacement, or a bonus draw from p_{k+1} when all k were accepted), so it never emits fewer than one.

Each function returns its statistics: how many drafts were accepted and, per drafted position, the
probability β_j = Σ_x min(p_j(x), q_j(x)) that the position would be accepted (Leviathan's α is E[β]);
for a greedy or n-gram (point-mass) draft, β_j is 1[d_j = argmax p_j] or p_j(d_j).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from graphopt.runtime.sampler import SamplingParams, filtered_probs


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """The outcome of one verification round."""

    tokens: list[int]  # accepted drafts, then one token from the target (len = num_accepted + 1)
    num_accepted: int  # drafts kept, 0..num_proposed
    num_proposed: int  # k
    betas: tuple[float, ...]  # per drafted position: probability it would be accepted (see module doc)


def accept_greedy(drafts: Sequence[int], target_argmax: Sequence[int]) -> Acceptance:
    """Keep the longest prefix of ``drafts`` that matches the target's argmax at each position.

    ``target_argmax[j]`` is the target's choice after the first j drafts (k + 1 entries). The emitted tokens
    are exactly what greedy decoding without speculation would produce.
    """
    drafts, best = [int(t) for t in drafts], [int(t) for t in target_argmax]
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == best[accepted]:
        accepted += 1
    betas = tuple(float(d == b) for d, b in zip(drafts, best))
    return Acceptance(drafts[:accepted] + [best[accepted]], accepted, len(drafts), betas)


def accept_sampled(drafts: Sequence[int], draft_probs: np.ndarray | None, target_probs: np.ndarray,
                   uniforms: Sequence[float]) -> Acceptance:
    """Rejection sampling over one round.

    Args:
        drafts: d_1..d_k, each drawn from its draft distribution.
        draft_probs: q_1..q_k as [k, V]; None for a point-mass draft (n-gram lookup: q_j = 1 at d_j).
        target_probs: p_1..p_{k+1} as [k+1, V], the target's filtered, normalised distributions.
        uniforms: k + 1 numbers in [0, 1): one accept test per draft, one for the final draw.
    """
    k = len(drafts)
    for j, token in enumerate(drafts):
        p = target_probs[j]
        q_token = 1.0 if draft_probs is None else float(draft_probs[j, token])
        # accept with probability min(1, p/q): u < p/q, written without dividing (q(d) > 0: d was drawn from q)
        if uniforms[j] * q_token < p[token]:
            continue
        # rejected: the replacement comes from the part of p that q under-covers, max(0, p − q), normalised
        residual = _residual(p, token, None if draft_probs is None else draft_probs[j])
        replacement = draw(residual, uniforms[k])
        return Acceptance([int(t) for t in drafts[:j]] + [replacement], j, k,
                          _betas(drafts, draft_probs, target_probs))
    bonus = draw(target_probs[k], uniforms[k])  # every draft kept: one more token, free, from p_{k+1}
    return Acceptance([int(t) for t in drafts] + [bonus], k, k, _betas(drafts, draft_probs, target_probs))


def _residual(p: np.ndarray, token: int, q: np.ndarray | None) -> np.ndarray:
    if q is None:  # point mass at `token`: max(0, p − 1[token]) is p without that token
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    # all-zero only if p ≤ q everywhere, i.e. p == q, where a rejection has probability 0; stay safe anyway
    return residual if residual.sum() > 0 else p


def _betas(drafts: Sequence[int], draft_probs: np.ndarray | None, target_probs: np.ndarray) -> tuple[float, ...]:
    if draft_probs is None:
        return tuple(float(target_probs[j, token]) for j, token in enumerate(drafts))
    k = len(drafts)
    return tuple(float(v) for v in np.minimum(target_probs[:k], draft_probs[:k]).sum(axis=1))


def draw(probs: np.ndarray, uniform: float) -> int:
    """Inverse-CDF draw from unnormalised ``probs`` [V] with one uniform (as the sampler draws)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    return min(int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), len(probs) - 1)


def dense_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution the sampler draws from for ``params`` (temperature, top-k/p, min-p), as dense [n, V]."""
    n = logits.shape[0]
    temperature = np.full(n, params.temperature, dtype=np.float64)
    if params.top_k == 0 and params.top_p == 1 and params.min_p == 0:
        return filtered_probs(logits, temperature, None, None)[1].astype(np.float64)
    ids, kept = filtered_probs(logits, temperature, np.full(n, params.top_k), np.full(n, params.top_p),
                               np.full(n, params.min_p))
    dense = np.zeros(logits.shape, dtype=np.float64)
    np.put_along_axis(dense, ids, kept, axis=1)
    return dense


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round emits on average with acceptance rate ``alpha``: (1 − α^(k+1)) / (1 − α)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def leviathan_speedup(alpha: float, k: int, cost_ratio: float) -> float:
    """Predicted walltime speedup (Leviathan et al. 2023, eq. 1): (1 − α^(k+1)) / ((1 − α)(ck + 1))."""
    return expected_tokens(alpha, k) / (cost_ratio * k + 1.0)
