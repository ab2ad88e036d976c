"""Sampling, vectorised over the batch with numpy.

Order per row, as in Hugging Face: penalties → grammar mask (structured output, ``allowed``) → temperature →
top-k → top-p → min-p → draw.
``temperature == 0`` is greedy (argmax of the penalised logits; top-k/top-p/min-p ignored). Values float32 cannot
compute are kept out at construction: a temperature below ``MIN_TEMPERATURE`` (1e-5) is greedy (set to 0: 1/T
would overflow float32 and the distribution is a point mass anyway), and ``repetition_penalty`` must lie in
[``MIN_REPETITION_PENALTY``, ``MAX_REPETITION_PENALTY``] = [0.01, 100] (beyond, penalised logits overflow or
vanish in float32; HF and vLLM users stay within [1, 2]). Each request
owns a ``np.random.Generator`` and draws exactly one uniform per sampled token, so a seeded request gives
the same tokens whatever else shares its batch. Penalties and log-probabilities: ``penalties.py``.

Top-k/top-p look at the best ``candidates`` tokens per row (one ``argpartition``, then a sort of that
slice), widening the slice (x16, then the whole vocabulary) only when a row's nucleus does not fit:
exact either way, and the full argsort of a 49k vocabulary (~0.5 ms a row) is left to flat distributions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS
from graphopt.runtime.penalties import apply_penalties
from graphopt.runtime.structured import GuidedSpec

MIN_TEMPERATURE = 1e-5  # below it (and above 0): greedy
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. Invalid values raise :class:`RuntimeInputError` at construction.

    ``min_p`` keeps tokens with probability ≥ min_p x the best one's (0 = off). ``repetition_penalty``
    (1 = off) divides positive / multiplies negative logits of every token in the prompt or output;
    ``presence_penalty`` and ``frequency_penalty`` (0 = off) subtract ``presence + frequency x count``
    from the logit of each token already generated (OpenAI's definition). ``stop`` strings end the text
    (matched on detokenized text by the LLM); ``stop_token_ids`` end it at those tokens. ``ignore_eos``
    keeps generating past the model's end tokens. ``logprobs``: None = off, n ≥ 0 = the chosen token's
    log-probability and the n most likely alternatives (from the raw model distribution). ``guided``: the
    grammar the output must match (structured.py), None = free text.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    guided: GuidedSpec | None = None

    def __post_init__(self) -> None:
        self._normalise_stops()
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1] (0 = off)"),
            ("repetition_penalty", _is_number(self.repetition_penalty)
             and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
             f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}] (1 = off)"),
            ("presence_penalty", _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "in [-2, 2] (0 = off)"),
            ("frequency_penalty", _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "in [-2, 2] (0 = off)"),
            ("seed", self.seed is None or (_is_int(self.seed) and self.seed >= 0), "None or an integer >= 0"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "True or False"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= 20),
             "None or an integer in 0..20"),
            ("guided", self.guided is None or isinstance(self.guided, GuidedSpec), "None or a GuidedSpec"),
        ]
        for field, ok, valid in checks:
            if not ok:
                raise RuntimeInputError(f"sampling parameter {field}={getattr(self, field)!r:.80} is invalid; "
                                        f"use {valid}")
        if self.temperature < MIN_TEMPERATURE:  # 1/T overflows float32: a point mass, i.e. greedy
            object.__setattr__(self, "temperature", 0.0)

    def _normalise_stops(self) -> None:
        try:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        except (TypeError, ValueError):
            raise RuntimeInputError(
                f"sampling parameter stop_token_ids={self.stop_token_ids!r} is invalid; use a list of token ids"
            ) from None
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop) \
                or len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
            raise RuntimeInputError(
                f"sampling parameter stop={self.stop!r:.80} is invalid; use a string or a list of up to "
                f"{MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters each"
            )
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and bool(np.isfinite(value))


def make_generator(params: SamplingParams) -> np.random.Generator:
    """The request's random stream: seeded when ``params.seed`` is set, fresh entropy otherwise."""
    return np.random.default_rng(params.seed)


def filtered_probs(logits: np.ndarray, temperature: np.ndarray, top_k: np.ndarray | None,
                   top_p: np.ndarray | None, min_p: np.ndarray | None = None,
                   candidates: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the kept tokens (ids [B, C], best first) and their renormalised probabilities [B, C].

    ``logits`` [B, V]; ``temperature`` (> 0), ``top_k`` (0 = off), ``top_p`` (1 = off), ``min_p`` (0 = off):
    [B] each. Entries past a row's kept set have probability 0. With ``top_k`` and ``top_p`` None: ids are
    0..V-1, unsorted, nothing filtered.
    """
    weights = np.subtract(logits, logits.max(axis=1, keepdims=True), dtype=np.float32)
    weights *= (1.0 / temperature).astype(np.float32)[:, None]  # in place: [B, V] temporaries page-fault
    np.exp(weights, out=weights)  # unnormalised probabilities
    total = weights.sum(axis=1, dtype=np.float64, keepdims=True)
    vocab = logits.shape[1]
    if top_k is None or top_p is None:
        weights /= total.astype(np.float32)
        return np.broadcast_to(np.arange(vocab), logits.shape), weights
    min_p = np.zeros(len(logits)) if min_p is None else min_p
    width = min(vocab, max(candidates, int(top_k.max())))
    while True:  # widen the slice until every row's kept set lies inside it (a full sort at worst)
        ids, kept = _top_slice(weights, width)
        kept = kept / total
        if width == vocab or _nucleus_fits(kept, top_k, top_p, min_p):
            break
        width = min(vocab, width * 16)
    rank = np.arange(width)[None, :]
    keep = np.where(top_k[:, None] > 0, rank < top_k[:, None], True)
    kept = np.where(keep, kept, 0.0)
    before = np.cumsum(kept, axis=1) - kept  # mass of the better tokens, within top-k
    keep &= before < top_p[:, None] * kept.sum(axis=1, keepdims=True)
    keep &= kept >= min_p[:, None] * kept[:, :1]  # min-p: relative to the best token (kept by every filter)
    kept = np.where(keep, kept, 0.0)
    return ids, kept / kept.sum(axis=1, keepdims=True)


def _top_slice(weights: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``width`` most likely ids per row, best first, and their weights (float64)."""
    vocab = weights.shape[1]
    if width < vocab:
        part = np.argpartition(weights, vocab - width, axis=1)[:, vocab - width:]
    else:
        part = np.broadcast_to(np.arange(vocab), weights.shape)
    part_weights = np.take_along_axis(weights, part, axis=1)
    order = np.argsort(-part_weights, axis=1)  # float32 quicksort: SIMD, ~10x a stable float64 sort
    ids = np.take_along_axis(part, order, axis=1)
    return ids, np.take_along_axis(part_weights, order, axis=1).astype(np.float64)


def _nucleus_fits(kept: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray) -> bool:
    """True when every row's kept set lies inside the slice: top-k within it, the top-p mass reached, or
    the slice's last token already under the min-p threshold (the kept set is the filters' intersection)."""
    by_k = (top_k > 0) & (top_k <= kept.shape[1])
    by_p = (top_p < 1) & (kept.sum(axis=1) >= top_p)
    by_min = (min_p > 0) & (kept[:, -1] < min_p * kept[:, 0])
    return bool(np.all(by_k | by_p | by_min))


def sample_rows(logits: np.ndarray, params: Sequence[SamplingParams], generators: Sequence[np.random.Generator],
                history: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
                allowed: np.ndarray | None = None) -> np.ndarray:
    """Next token ids [B] (int64) for ``logits`` [B, V]: row b follows ``params[b]``, draws from ``generators[b]``.

    ``history[b]`` = (prompt ids, generated ids) of row b, needed only when a row sets a penalty.
    ``allowed`` [B, V] bool (structured output): tokens outside it get probability 0, greedy rows included;
    every row must allow at least one token. ``logits`` is never modified (penalties and masks work on copies).
    """
    penalised = [row for row, p in enumerate(params) if p.penalised]
    if penalised:
        if history is None:
            raise RuntimeInputError("a request sets a repetition/presence/frequency penalty; pass its token history")
        logits = apply_penalties(logits, penalised, params, history)
    if allowed is not None:
        if not allowed.any(axis=1).all():
            raise RuntimeInputError("a row's token mask allows no token; end that request instead of sampling it")
        logits = np.where(allowed, logits, np.float32(-np.inf))  # after penalties: they keep -inf at -inf
    tokens = np.argmax(logits, axis=1).astype(np.int64)
    temperature = np.array([p.temperature for p in params], dtype=np.float64)
    sampled = temperature > 0
    if not sampled.any():
        return tokens
    top_k = np.array([p.top_k for p in params], dtype=np.int64)
    top_p = np.array([p.top_p for p in params], dtype=np.float64)
    min_p = np.array([p.min_p for p in params], dtype=np.float64)
    filtered = sampled & ((top_k > 0) | (top_p < 1) | (min_p > 0))
    plain = np.flatnonzero(sampled & ~filtered)
    if plain.size:  # temperature only: draw from the whole vocabulary, no sort
        _, probs = filtered_probs(_rows(logits, plain), temperature[plain], None, None)
        tokens[plain] = _draw(probs, [generators[r] for r in plain])
    rows = np.flatnonzero(filtered)
    if rows.size:
        ids, probs = filtered_probs(_rows(logits, rows), temperature[rows], top_k[rows], top_p[rows], min_p[rows])
        tokens[rows] = ids[np.arange(rows.size), _draw(probs, [generators[r] for r in rows])]
    return tokens


def _draw(probs: np.ndarray, generators: list[np.random.Generator]) -> np.ndarray:
    """Inverse-CDF draw per row, one uniform from each row's own generator."""
    picks = np.empty(len(generators), dtype=np.int64)
    for row, generator in enumerate(generators):  # per row: a [V] cdf stays in cache, [B, V] does not
        cdf = np.cumsum(probs[row], dtype=np.float64)
        target = generator.random() * cdf[-1]
        picks[row] = min(int(np.searchsorted(cdf, target, side="right")), probs.shape[1] - 1)
    return picks


def _rows(logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``logits[rows]`` without copying [B, V] when every row is selected."""
    return logits if rows.size == logits.shape[0] else logits[rows]


class Sampler:
    """Picks the next token for a fixed set of requests, each with its own params and generator."""

    def __init__(self, params: Sequence[SamplingParams]) -> None:
        self.params = list(params)
        self.generators = [make_generator(p) for p in self.params]

    def sample(self, logits: np.ndarray, requests: Sequence[int] | np.ndarray,
               history: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> np.ndarray:
        """Next token ids [B] (int64) for ``logits`` [B, V], row b belonging to request ``requests[b]``."""
        requests = np.asarray(requests, dtype=np.int64).tolist()
        return sample_rows(logits, [self.params[r] for r in requests], [self.generators[r] for r in requests],
                           history)


def sample(logits: np.ndarray, params: SamplingParams, generator: np.random.Generator | None = None) -> np.ndarray:
    """Convenience: sample every row of ``logits`` [B, V] with one ``params`` (and one generator)."""
    generator = make_generator(params) if generator is None else generator
    return sample_rows(logits, [params] * logits.shape[0], [generator] * logits.shape[0])
