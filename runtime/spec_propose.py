"""Draft proposals for speculative decoding: n-gram prompt lookup and a draft model.

N-gram lookup (prompt lookup decoding, vLLM's ``ngram`` and TensorRT-LLM's lookahead-free variant): find the
latest earlier occurrence of the last n tokens (n = ``max_n`` down to ``min_n``) in the prompt and generated
text, and propose the k tokens that followed it. Its draft distribution is a point mass, so rejection
sampling accepts d with probability p(d).

A draft model keeps its own slot cache, mirrored slot for slot with the target's by the scheduler. Each round
it first catches up on what it has not seen (the tokens accepted since its last round: one token usually,
two when every draft was accepted, the whole prompt the first time), then proposes one token per step;
steps are batched over rows in contiguous slots (GroupQueryAttention batches one-token rows; the two-token
catch-ups are batched too when the draft artifact has a multi-token graph).
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from graphopt.runtime.engine_api import Engine
from graphopt.runtime.sequence import Sequence
from graphopt.runtime.spec_accept import dense_probs, draw
from graphopt.runtime.spec_policy import CostModel

CATCH_UP = 2  # the most tokens a draft catches up on after a round (its last draft and the target's token)


def ngram_lookup(tokens: Seq[int], k: int, max_n: int = 3, min_n: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier match of the longest suffix n-gram (n ≥ ``min_n``)."""
    ids = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        windows = sliding_window_view(ids[:-1], n)  # every n-gram that ends before the last token
        hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return ids[start:start + k].tolist()
    return []


def feed(engine: Engine, slots: Seq[int], chunks: Seq[Seq[int]], costs: CostModel | Any = None,
         kind: str = "decode") -> np.ndarray:
    """Append ``chunks[i]`` to slot ``slots[i]``; each row's last-token logits [n, V] (a fresh array).

    Rows in contiguous slots share one call when each brings one token (timed into ``costs`` as ``kind`` by
    batch size), or up to two (a draft's catch-up after a round that accepted every draft) when the engine
    has a multi-token graph; a longer row on top of a cache (a prompt) runs alone.
    """
    out = np.empty((len(slots), engine.vocab_size), dtype=np.float32)
    short = CATCH_UP if engine.capabilities.multi_row_multi_token else 1
    start = 0
    while start < len(slots):
        stop = start + 1
        if len(chunks[start]) <= short:
            while stop < len(slots) and len(chunks[stop]) <= short and slots[stop] == slots[stop - 1] + 1:
                stop += 1
        if stop - start > 1 and any(len(chunk) > 1 for chunk in chunks[start:stop]):
            engine.prepare_multi_token()  # prefill batches multi-token rows over a cache once it is loaded
        began = time.perf_counter()
        out[start:stop] = engine.prefill(chunks[start:stop], slots[start:stop])
        if costs is not None and all(len(chunk) == 1 for chunk in chunks[start:stop]):
            costs.observe(kind, stop - start, time.perf_counter() - began)
        start = stop
    return out


class DraftModel:
    """Proposes k tokens per row with a draft artifact whose cache mirrors the target's slots."""

    def __init__(self, engine: Engine, costs: CostModel) -> None:
        self.engine = engine
        self.costs = costs
        self.prefilled = False  # the last proposal also prefilled a prompt (a one-off cost, not a step's)

    def propose(self, seqs: Seq[Sequence], ks: Seq[int]) -> tuple[list[list[int]], list[np.ndarray | None]]:
        """Drafts per row and their draft distributions q [k, V] (None for greedy requests)."""
        cache = self.engine.cache
        chunks = [seq.tokens()[int(cache.lens[seq.slot]):] for seq in seqs]  # catch-up: all it has not seen
        self.prefilled = any(len(chunk) > CATCH_UP for chunk in chunks)
        logits = feed(self.engine, [seq.slot for seq in seqs], chunks, self.costs, "draft")
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[list[np.ndarray]] = [[] for _ in seqs]
        rows = list(range(len(seqs)))
        while True:
            for i, row in enumerate(rows):
                drafts[row].append(self._pick(seqs[row], logits[i], probs[row]))
            rows = [row for row in rows if len(drafts[row]) < ks[row]]
            if not rows:
                break
            logits = feed(self.engine, [seqs[r].slot for r in rows], [[drafts[r][-1]] for r in rows], self.costs,
                          "draft")
        return drafts, [np.stack(p) if p else None for p in probs]

    @staticmethod
    def _pick(seq: Sequence, logits: np.ndarray, probs: list[np.ndarray]) -> int:
        if seq.params.greedy:
            return int(np.argmax(logits))
        q = dense_probs(logits[None], seq.params)[0]
        probs.append(q)
        return draw(q, seq.generator.random())

    def rollback(self, slot: int, keep: int) -> None:
        """Keep at most ``keep`` cached tokens: the draft fed its own proposals, and the rejected ones go."""
        cache = self.engine.cache
        cache.truncate(slot, min(int(cache.lens[slot]), keep))
