"""Speculative decoding inside in-flight batching: propose, verify k+1 positions in one target call, roll back.

One decode step with speculation (:meth:`Speculator.run`), for the rows the policy gave k > 0::

    propose   n-gram lookup in the request's tokens, or the draft model (catch-up feed + k batched steps)
    verify    target.step over every row of the step: [last, d_1..d_k] for speculating rows, [last] for the
              others (right-padded), logit_positions 0..k  → p_1..p_{k+1}; one call per contiguous slot range
    accept    spec_accept: greedy prefix match, or rejection sampling → accepted drafts + one target token
              (a request with a grammar: drafts cut where the grammar refuses one, targets masked; structured.py)
    rollback  target cache: keep T + n (the prompt/output so far plus the n accepted drafts); draft cache:
              keep what matches; both are just lower ``cache_lens``

On ort-cpu GroupQueryAttention refuses several rows of k+1 tokens over a cache; the artifact's multi-token
graph (``model_verify.onnx``, standard TensorScatter + Attention) runs them in one call, plain rows included.
An artifact without it (older builds) falls back to one call per speculating row, with the plain rows decoded
as usual, batched by contiguous slots. Either way the policy (spec_policy.py) weighs the step against one
batched decode, from measured costs, and turns speculation off for a batch when it would be slower.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np

from graphopt.core.errors import ArtifactError, RuntimeInputError
from graphopt.runtime.engine_api import open_engine
from graphopt.runtime.engine_api import Engine
from graphopt.runtime.sequence import Sequence
from graphopt.runtime.spec_accept import Acceptance, accept_greedy, accept_sampled, dense_probs
from graphopt.runtime.spec_policy import CostModel, SpecPolicy, verify_cost_key
from graphopt.runtime.spec_propose import DraftModel, feed, ngram_lookup
from graphopt.runtime.structured import constrain_drafts

log = logging.getLogger(__name__)
METHODS = ("draft", "ngram")
CALIBRATION_CONTEXT = 64  # cached tokens per scratch slot when timing calls at start


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """``method``: "draft" (needs ``draft``, an artifact with the target's tokenizer) or "ngram";
    ``num_speculative_tokens``: the most drafts per round (K); ``adaptive``: let measured costs and acceptance
    turn K down or off (False: always K, for tests and measurements). Greedy output is the same as without
    speculation; sampled output has the same distribution, but a seeded request draws different numbers (its
    generator also drafts and tests acceptance), so its tokens differ from the same seed without speculation."""

    method: str = "draft"
    num_speculative_tokens: int = 4
    draft: Path | None = None
    adaptive: bool = True
    ngram_max: int = 3
    ngram_min: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RuntimeInputError(f"speculative method {self.method!r} is unknown; use one of {list(METHODS)}")
        if (self.method == "draft") != (self.draft is not None):
            raise RuntimeInputError("speculative decoding needs exactly one of --draft DRAFT_ARTIFACT or "
                                    "--speculative ngram")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise RuntimeInputError(f"num_speculative_tokens={k!r} is invalid; use an integer in 1..16")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise RuntimeInputError(f"ngram sizes {self.ngram_min}..{self.ngram_max} are invalid; use 1 <= min <= max")


@dataclasses.dataclass
class SpecResult:
    """What a speculative step produced: sampled-later logits for plain rows, emitted tokens for the others."""

    plain_rows: list[int]
    logits: np.ndarray  # [len(plain_rows), V]
    accepted: dict[int, Acceptance]  # row -> its round's outcome (tokens to emit)
    target_logits: dict[int, np.ndarray]  # row -> [k+1, V] (for log-probabilities)


def check_draft(target: Engine, draft: Engine, target_dir: Path, draft_dir: Path) -> None:
    """The draft must speak the target's vocabulary: same size and the same tokenizer."""
    fix = "use a draft built from the same model family, e.g. 'graphopt build MODEL --int4'"
    if draft.vocab_size != target.vocab_size:
        raise ArtifactError(f"draft {draft_dir} has a vocabulary of {draft.vocab_size} tokens but the target "
                            f"{target_dir} has {target.vocab_size}; {fix}")
    if _vocab(draft_dir) != _vocab(target_dir):
        raise ArtifactError(f"draft {draft_dir} has a different tokenizer from the target {target_dir}; {fix}")
    if draft.max_seq < target.max_seq:
        raise ArtifactError(f"draft {draft_dir} holds {draft.max_seq} positions but the target runs with "
                            f"{target.max_seq}; lower --max-seq to {draft.max_seq} or rebuild the draft")


def _vocab(artifact: Path) -> object:
    path = artifact / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get("model", {}).get("vocab"), [t.get("content") for t in data.get("added_tokens", [])]


class Speculator:
    """Drafting, batched verification bookkeeping, acceptance and rollback for one target engine."""

    def __init__(self, config: SpecConfig, target: Engine, target_dir: Path, threads: int | None = None) -> None:
        self.config = config
        self.target = target
        self.costs = CostModel()
        target.prepare_multi_token()  # one that will not load leaves per-row verification
        self.policy = SpecPolicy(config.num_speculative_tokens, self.costs, config.adaptive,
                                 draft_model=config.method == "draft",
                                 batched=target.capabilities.multi_row_multi_token)
        self.draft: DraftModel | None = None
        if config.method == "draft":
            engine = open_engine(config.draft, max_slots=target.cache.max_slots, max_seq=target.max_seq,
                                 threads=threads, spinning=False)
            check_draft(target, engine, Path(target_dir), Path(config.draft))
            engine.prepare_multi_token()
            self.draft = DraftModel(engine, self.costs)
        if config.adaptive:
            self.calibrate()

    @property
    def mirrors(self) -> list:
        """Slot caches the scheduler must keep in step with the target's (allocate, move, free)."""
        return [self.draft.engine.cache] if self.draft is not None else []

    def plan(self, seqs: Seq[Sequence]) -> list[int]:
        return self.policy.plan(seqs)

    # ---- one step ----------------------------------------------------------------------------------------
    def run(self, seqs: Seq[Sequence], ks: Seq[int]) -> SpecResult:
        """Decode ``seqs`` (slots in row order), speculating ``ks[i]`` tokens for row i."""
        began = time.perf_counter()
        rows = [row for row, k in enumerate(ks) if k > 0]
        drafts, probs = self._propose([seqs[r] for r in rows], [ks[r] for r in rows])
        spec = {row: (d, q) for row, d, q in zip(rows, drafts, probs) if d}
        chunks = [[seq.last_token, *spec[row][0]] if row in spec else [seq.last_token] for row, seq in enumerate(seqs)]
        plain = [row for row in range(len(seqs)) if row not in spec]
        if spec and self._batched(seqs, chunks):  # every row in one call per contiguous slot range
            scored = dict(enumerate(self.verify_rows([seq.slot for seq in seqs], chunks)))
            logits = np.stack([scored[r][0] for r in plain]) if plain else np.empty((0, self.target.vocab_size))
        else:  # plain rows batched by GQA, then one call per speculating row
            logits = feed(self.target, [seqs[r].slot for r in plain], [chunks[r] for r in plain], self.costs)
            scored = {row: self.verify(seqs[row].slot, chunks[row]) for row in spec}
        result = SpecResult(plain, logits, {}, {})
        for row, (draft_tokens, q) in spec.items():
            seq = seqs[row]
            accepted = self._accept(seq, draft_tokens, q, scored[row])
            self._rollback(seq, accepted)
            result.accepted[row], result.target_logits[row] = accepted, scored[row]
        if self.draft is None or not self.draft.prefilled:  # a draft's prompt prefill is not a step's overhead
            self.policy.observe_step(ks, time.perf_counter() - began)
        return result

    def _batched(self, seqs: Seq[Sequence], chunks: list[list[int]]) -> bool:
        """The artifact has a multi-token graph and every row has room for the step's longest chunk (padding)."""
        longest, cache = max(map(len, chunks)), self.target.cache
        return self.target.capabilities.multi_row_multi_token and \
            all(int(cache.lens[s.slot]) + longest <= cache.max_seq for s in seqs)

    def _propose(self, seqs: list[Sequence], ks: list[int]) -> tuple[list[list[int]], list[np.ndarray | None]]:
        if not seqs:
            return [], []
        if self.draft is not None:
            return self.draft.propose(seqs, ks)
        began = time.perf_counter()
        cfg = self.config
        drafts = [ngram_lookup(seq.tokens(), k, cfg.ngram_max, cfg.ngram_min) for seq, k in zip(seqs, ks)]
        self.costs.observe("draft", len(seqs), time.perf_counter() - began)
        return drafts, [None] * len(seqs)

    def verify(self, slot: int, tokens: list[int], costs: CostModel | SampleLog | None = None) -> np.ndarray:
        """Append ``tokens`` to ``slot`` in one target call; logits at every one of them [len, V] (a copy)."""
        cache, n = self.target.cache, len(tokens)
        cache.check_room(slot, n)
        start = int(cache.lens[slot])
        began = time.perf_counter()
        logits = self.target.step(np.asarray([tokens], dtype=np.int64), np.arange(start, start + n)[None],
                                  np.asarray([start], dtype=np.int32), np.asarray([n], dtype=np.int32),
                                  np.arange(n, dtype=np.int64)[None], first_slot=slot)[0].copy()
        (costs or self.costs).observe("verify", n - 1, time.perf_counter() - began)
        cache.advance(slot, n)
        return logits

    def verify_rows(self, slots: list[int], chunks: list[list[int]],
                    costs: CostModel | SampleLog | None = None) -> list[np.ndarray]:
        """Append ``chunks[i]`` to ``slots[i]``, one target call per contiguous slot range (the multi-token
        graph: rows right-padded to the longest chunk); logits at every appended token, [len, V] per row."""
        out: list[np.ndarray] = []
        start = 0
        while start < len(slots):
            stop = start + 1
            while stop < len(slots) and slots[stop] == slots[stop - 1] + 1:
                stop += 1
            out += self._verify_range(slots[start], chunks[start:stop], costs or self.costs)
            start = stop
        return out

    def _verify_range(self, first: int, chunks: list[list[int]], costs: CostModel | SampleLog) -> list[np.ndarray]:
        cache, batch, seq = self.target.cache, len(chunks), max(map(len, chunks))
        lens = cache.lens[first:first + batch].copy()
        counts = np.array([len(chunk) for chunk in chunks], dtype=np.int32)
        ids = np.full((batch, seq), self.target.pad_token_id, dtype=np.int64)
        for row, chunk in enumerate(chunks):
            ids[row, :len(chunk)] = chunk
        began = time.perf_counter()
        logits = self.target.step(ids, lens[:, None] + np.arange(seq), lens, counts,
                                  np.minimum(np.arange(seq)[None], counts[:, None] - 1), first_slot=first)
        out = [logits[row, :n].copy() for row, n in enumerate(counts)]
        key = ("decode", batch) if seq == 1 else verify_cost_key(batch, seq - 1)  # a range of plain rows only
        costs.observe(*key, time.perf_counter() - began)
        for row, n in enumerate(counts):
            cache.advance(first + row, int(n))
        return out

    def _accept(self, seq: Sequence, drafts: list[int], q: np.ndarray | None, logits: np.ndarray) -> Acceptance:
        proposed = len(drafts)
        if seq.constraint is not None:  # structured output: drafts checked against the grammar, targets masked
            drafts, logits = constrain_drafts(seq, drafts, logits)
            q = None if q is None else q[: len(drafts)]
        if seq.params.greedy:
            accepted = accept_greedy(drafts, logits.argmax(axis=1))
        else:
            accepted = accept_sampled(drafts, q, dense_probs(logits, seq.params), seq.generator.random(len(drafts) + 1))
        if len(drafts) < proposed:  # drafts the grammar cut count as proposed and rejected (for α and k)
            accepted = dataclasses.replace(accepted, num_proposed=proposed,
                                           betas=accepted.betas + (0.0,) * (proposed - len(drafts)))
        self.policy.record(seq, accepted.betas, accepted.num_accepted)
        return accepted

    def _rollback(self, seq: Sequence, accepted: Acceptance) -> None:
        """Target keeps the T tokens it had seen plus the accepted drafts; the new last token is not cached yet."""
        keep = seq.num_tokens + accepted.num_accepted
        self.target.cache.truncate(seq.slot, keep)
        if self.draft is not None:
            self.draft.rollback(seq.slot, keep)

    # ---- costs -------------------------------------------------------------------------------------------
    def calibrate(self, repeats: int = 3) -> None:
        """Time target decode (by batch), verification (by k) and draft steps on scratch slots, once at start;
        the cost model starts from the median of ``repeats`` rounds (after one warm-up round)."""
        engines = [self.target] + ([self.draft.engine] if self.draft is not None else [])
        if any(engine.cache.num_active for engine in engines):
            raise RuntimeInputError("speculative calibration needs idle engines; calibrate before adding requests")
        batch = min(self.target.cache.max_slots, 8)
        samples = SampleLog()
        try:
            context = max(1, min(CALIBRATION_CONTEXT, self.target.max_seq // 2 - self.config.num_speculative_tokens - 4))
            for engine in engines:  # caches of a typical length: attention cost grows with it
                slots = [engine.cache.allocate() for _ in range(batch)]
                engine.prefill([[self.target.pad_token_id] * context] * batch, slots)
            for rep in range(repeats + 1):
                log_to = samples if rep else SampleLog()  # the first round warms ORT up and is dropped
                for size in sorted({1, 2, batch} & set(range(1, batch + 1))):
                    for engine, kind in zip(engines, ("decode", "draft")):
                        feed(engine, list(range(size)), [[0]] * size, log_to, kind)
                for k in range(1, self.config.num_speculative_tokens + 1):
                    self.verify(0, [0] * (k + 1), log_to)
                    self.target.cache.truncate(0, context)
                self._calibrate_batched(batch, context, log_to)
        finally:
            for engine in engines:
                engine.cache.free_all()
        for (kind, size), seconds in samples.times.items():
            self.costs.observe(kind, size, float(np.median(seconds)))
        log.info("speculative calibration (ms): %s", {kind: {n: round(t * 1e3, 3) for n, t in table.items()}
                                                       for kind, table in self.costs.times.items()})

    def _calibrate_batched(self, batch: int, context: int, log_to: SampleLog) -> None:
        """Time the multi-token graph on 2 and ``batch`` rows at a few draft lengths (interpolated between)."""
        if not self.target.capabilities.multi_row_multi_token or batch < 2:
            return
        top = self.config.num_speculative_tokens
        for size in sorted({2, batch}):
            for k in sorted({1, (top + 1) // 2, top}):
                self.verify_rows(list(range(size)), [[0] * (k + 1)] * size, log_to)
                for slot in range(size):
                    self.target.cache.truncate(slot, context)


class SampleLog:
    """Every timing, kept (calibration takes their median)."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, int], list[float]] = {}

    def observe(self, kind: str, size: int, seconds: float) -> None:
        self.times.setdefault((kind, size), []).append(seconds)
