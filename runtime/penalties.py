"""Logit penalties and log-probabilities, vectorised over the rows that ask for them.

Penalties touch only the (row, token) pairs in each row's history, gathered as flat indices
``row * V + token`` into one array, so a step costs O(history) rather than O(rows x vocabulary)::

    repetition r (prompt + output tokens):  logit > 0 → logit / r,  logit ≤ 0 → logit * r     (CTRL, HF)
    presence p, frequency f (output tokens, count c):  logit -= p + f * c                   (OpenAI)

Log-probabilities come from the raw model logits (before penalties and temperature), as OpenAI reports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from graphopt.runtime.sampler import SamplingParams


def _flat_ids(rows: Sequence[int], ids: Sequence[Sequence[int]], vocab: int) -> np.ndarray:
    parts = [row * vocab + np.asarray(tokens, dtype=np.int64) for row, tokens in zip(rows, ids)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def apply_penalties(logits: np.ndarray, rows: Sequence[int], params: Sequence[SamplingParams],
                    history: Sequence[tuple[Sequence[int], Sequence[int]]]) -> np.ndarray:
    """A float32 copy of ``logits`` [B, V] with each of ``rows``' penalties applied (other rows unchanged)."""
    out = np.array(logits, dtype=np.float32)
    vocab = out.shape[1]
    flat = out.reshape(-1)
    repeat = [row for row in rows if params[row].repetition_penalty != 1]
    if repeat:
        seen = np.unique(_flat_ids(repeat, [list(history[r][0]) + list(history[r][1]) for r in repeat], vocab))
        factor = np.array([p.repetition_penalty for p in params], dtype=np.float32)[seen // vocab]
        values = flat[seen]
        flat[seen] = np.where(values > 0, values / factor, values * factor)
    additive = [row for row in rows if params[row].presence_penalty != 0 or params[row].frequency_penalty != 0]
    if additive:
        ids, counts = np.unique(_flat_ids(additive, [history[r][1] for r in additive], vocab), return_counts=True)
        owner = ids // vocab
        presence = np.array([p.presence_penalty for p in params], dtype=np.float32)[owner]
        frequency = np.array([p.frequency_penalty for p in params], dtype=np.float32)[owner]
        flat[ids] -= presence + frequency * counts.astype(np.float32)
    return out


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the ``n`` most likely tokens (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, counts: Sequence[int]) -> list[TokenLogprob]:
    """Per row of ``logits`` [R, V]: log-softmax at ``tokens[r]`` and the top ``counts[r]`` alternatives."""
    shifted = np.subtract(logits, logits.max(axis=1, keepdims=True), dtype=np.float64)
    log_total = np.log(np.exp(shifted).sum(axis=1))
    chosen = shifted[np.arange(len(tokens)), tokens] - log_total
    width = max(counts, default=0)
    top_ids = np.zeros((len(tokens), 0), np.int64)
    if width:
        top_ids = np.argpartition(-shifted, width - 1, axis=1)[:, :width]
        order = np.argsort(-np.take_along_axis(shifted, top_ids, axis=1), axis=1, kind="stable")
        top_ids = np.take_along_axis(top_ids, order, axis=1)
    result = []
    for row, (token, n) in enumerate(zip(tokens.tolist(), counts)):
        top = tuple((int(i), float(shifted[row, i] - log_total[row])) for i in top_ids[row, :n])
        result.append(TokenLogprob(int(token), float(chosen[row]), top))
    return result
