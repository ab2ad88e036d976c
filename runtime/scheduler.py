"""In-flight batching: which sequences run in the next engine call. Pure Python, no model.

Slot layout (the engine binds contiguous slot ranges, GQA decodes slots 0..d-1)::

    slots:  [ D D D ... D | P ]      D = decoding (d of them, slots 0..d-1), P = at most one chunked prefill

Each step is either

- a **prefill** step: the sequence whose long prompt is being prefilled in chunks (alone: GQA on ort-cpu
  cannot batch rows that bring several tokens on top of a cache), or as many waiting requests as free slots
  and the token budget allow (``rows x longest prompt ≤ max_batch_tokens``, the padded cost; a prompt longer
  than the budget is admitted alone and prefilled ``max_batch_tokens`` tokens at a time); or
- a **decode** step: one token for every decoding sequence, slots 0..d-1 — or, with speculative decoding, the
  ``planner``'s k drafts on top for each speculating sequence: the step then stands for k+1 tokens per such
  sequence, and the k are cut (largest first) so the step's tokens stay within ``max_batch_tokens``.

When both kinds have work they alternate, so a long prompt delays running streams by one bounded chunk.

Policy when slots run out: waiting requests queue first-come first-served, up to ``max_queue`` (then
:class:`~graphopt.core.errors.OverloadedError`, which the server turns into 429). There is no preemption: a
request is refused at ``add`` unless prompt + max_new_tokens fits a slot, so an admitted request always
finishes in its slot. Finished requests free their slot in the step that finished them (:meth:`release`);
cancelled ones at the start of the next :meth:`schedule`. Freeing keeps the layout: the last decoding
sequence fills the hole, then the prefill sequence (if any) takes that one's place. ``mirrors`` (a draft
model's slot cache) get the same allocations, moves and frees, so slot i means the same request in each.

With ``prefix_cache`` (runtime/prefix_cache.py) an admitted request starts from the longest prefix a slot
holds (its reused tokens are cached from the start, so only the rest is prefilled and counted against the
budget), moves on release are swaps (the finished rows stay in a free slot, indexed), and a request sharing
a longer prefix with a row of the current prefill step than the cache holds waits for the next one.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable

import numpy as np

from graphopt.core.errors import OverloadedError, RuntimeInputError
from graphopt.runtime.kv_cache import SlotCache
from graphopt.runtime.prefix_cache import Match, PrefixCache, common_prefix
from graphopt.runtime.sequence import Sequence, Status


class StepKind(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """``max_batch_tokens``: padded prompt tokens per prefill step; ``max_queue``: waiting requests allowed."""

    max_batch_tokens: int = 256
    max_queue: int = 128

    def __post_init__(self) -> None:
        for field in ("max_batch_tokens", "max_queue"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RuntimeInputError(f"scheduler {field}={value!r} is invalid; use an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Step:
    """One engine call: ``chunks[i]`` are the tokens row i (``seqs[i]``, slot ``seqs[i].slot``) adds."""

    kind: StepKind
    seqs: list[Sequence]
    chunks: list[list[int]]
    num_speculative: list[int] = dataclasses.field(default_factory=list)  # drafts per row (decode steps)

    @property
    def slots(self) -> list[int]:
        return [seq.slot for seq in self.seqs]

    @property
    def speculating(self) -> bool:
        return any(self.num_speculative)

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk) for chunk in self.chunks) + sum(self.num_speculative)


class Scheduler:
    """Admits, batches and releases sequences over a :class:`SlotCache`'s slots."""

    def __init__(self, cache: SlotCache, config: SchedulerConfig = SchedulerConfig(),
                 planner: Callable[[list[Sequence]], list[int]] | None = None,
                 mirrors: tuple[SlotCache, ...] = (), prefix_cache: bool = False) -> None:
        self.cache = cache
        self.config = config
        self.planner = planner  # drafts per decoding sequence (speculative decoding), or None
        self.mirrors = tuple(mirrors)
        self.prefix = PrefixCache((cache, *self.mirrors)) if prefix_cache else None
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.slots: list[Sequence] = []  # slot i -> its sequence; mirrors cache.num_active
        self._cancelled = 0
        self._last_kind: StepKind | None = None

    # ---- queue -------------------------------------------------------------------------------------------
    @property
    def num_decoding(self) -> int:
        return len(self.slots) - (1 if self._partial() is not None else 0)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.slots)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``; refuse one that can never fit a slot, or any when the queue is full."""
        need = seq.num_prompt + seq.params.max_new_tokens
        if not seq.prompt_ids or need > self.cache.max_seq:
            raise RuntimeInputError(
                f"request {seq.request_id}: prompt {seq.num_prompt} tokens + max_new_tokens "
                f"{seq.params.max_new_tokens} = {need}, over the context limit {self.cache.max_seq} "
                "(or the prompt is empty); shorten the prompt or lower max_new_tokens"
            )
        if len(self.waiting) >= self.config.max_queue:
            raise OverloadedError(
                f"request queue is full ({self.config.max_queue} waiting, {len(self.slots)} slots busy); "
                "retry later, or raise --max-queue / --max-slots"
            )
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Mark ``seq`` cancelled; its slot is freed at the next :meth:`schedule`. False if already finished."""
        if seq.finished or seq.cancelled:
            return False
        seq.cancelled = True
        seq.finish_reason = "cancelled"
        self._cancelled += 1
        return True

    # ---- one step ----------------------------------------------------------------------------------------
    def schedule(self) -> Step | None:
        """Free cancelled sequences, then pick the next prefill or decode step (None when idle)."""
        self._reap_cancelled()
        step = self._prefill_step() if self._wants_prefill() else None
        step = step or self._decode_step()
        self._last_kind = step.kind if step else None
        return step

    def complete(self, step: Step, accepted: dict[int, int] | None = None) -> list[int]:
        """Record that ``step`` ran (``accepted[row]``: drafts kept in row's cache); returns the rows that now
        sample a token (prompt done, or decoding)."""
        rows = []
        for row, (seq, chunk) in enumerate(zip(step.seqs, step.chunks)):
            seq.num_cached += len(chunk) + (accepted or {}).get(row, 0)
            if seq.status is Status.PREFILL and seq.prompt_left == 0:
                seq.status = Status.DECODE
            if seq.status is Status.DECODE and not seq.cancelled:
                rows.append(row)
        return rows

    def release(self, seqs: list[Sequence]) -> None:
        """Free the slots of finished sequences now, highest slot first (a moved slot is never one to free)."""
        for seq in sorted(seqs, key=lambda s: s.slot, reverse=True):
            self._free(seq)

    # ---- internals ---------------------------------------------------------------------------------------
    def _partial(self) -> Sequence | None:
        last = self.slots[-1] if self.slots else None
        return last if last is not None and last.status is Status.PREFILL else None

    def _wants_prefill(self) -> bool:
        has_prefill = self._partial() is not None or (self.waiting and self.cache.num_free > 0)
        if not has_prefill:
            return False
        return self.num_decoding == 0 or self._last_kind is not StepKind.PREFILL

    def _prefill_step(self) -> Step | None:
        budget = self.config.max_batch_tokens
        partial = self._partial()
        if partial is not None:
            return Step(StepKind.PREFILL, [partial], [partial.next_chunk(budget)])
        seqs: list[Sequence] = []
        width = 0
        while self.waiting and self.cache.num_free > 0:
            found = self._cached_prefix(self.waiting[0])
            reusable = found.length if found is not None else 0
            if seqs and self._shares_with_step(self.waiting[0], seqs, reusable):
                break  # admitted next step, from this step's rows once they are cached (n > 1, a common prompt)
            width = max(width, self.waiting[0].num_prompt - reusable)
            if seqs and width * (len(seqs) + 1) > budget:
                break
            seqs.append(self._admit(self.waiting.popleft(), found))
        if not seqs:
            return None
        return Step(StepKind.PREFILL, seqs, [seq.next_chunk(budget) for seq in seqs])

    def _decode_step(self) -> Step | None:
        seqs = self.slots[: self.num_decoding]
        if not seqs:
            return None
        ks = self.planner(seqs) if self.planner is not None else []
        return Step(StepKind.DECODE, seqs, [[seq.last_token] for seq in seqs], self._fit_budget(ks))

    def _fit_budget(self, ks: list[int]) -> list[int]:
        """Cut the largest draft lengths until the step's k+1 tokens per row fit ``max_batch_tokens``."""
        ks = list(ks)
        while ks and sum(ks) + len(ks) > self.config.max_batch_tokens and max(ks) > 0:
            ks[ks.index(max(ks))] -= 1
        return ks

    def _cached_prefix(self, seq: Sequence) -> Match | None:
        """The longest prefix of ``seq``'s prompt the prefix cache holds now (None: none, or no prefix cache)."""
        return self.prefix.match(seq.prompt_ids, self.slots) if self.prefix is not None else None

    def _shares_with_step(self, seq: Sequence, rows: list[Sequence], reusable: int) -> bool:
        """A row this step prefills shares a longer prefix with ``seq`` than the cache holds now."""
        if self.prefix is None:
            return False
        shared = max(common_prefix(np.asarray(seq.prompt_ids), np.asarray(row.prompt_ids)) for row in rows)
        return min(shared, seq.num_prompt - 1) >= reusable + self.prefix.min_tokens

    def _admit(self, seq: Sequence, found: Match | None) -> Sequence:
        slot = self.cache.num_active
        if self.prefix is not None:
            self.prefix.admit(seq, found)  # allocates in every cache, with the reused prefix
        else:
            for cache in (self.cache, *self.mirrors):
                cache.allocate()
        seq.slot = slot
        assert seq.slot == len(self.slots), "scheduler slots out of step with the cache"
        seq.status = Status.PREFILL
        self.slots.append(seq)
        return seq

    def _reap_cancelled(self) -> None:
        if not self._cancelled:
            return
        self._cancelled = 0
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            seq.status = Status.FINISHED
        self.release([seq for seq in self.slots if seq.cancelled])

    def _free(self, seq: Sequence) -> None:
        """The last decoding sequence fills the hole, then the last active one (the prefill, if any) fills
        that; with the prefix cache the moves are swaps, so ``seq``'s rows end in the first free slot."""
        caches = (self.cache, *self.mirrors)
        lens = [int(cache.lens[seq.slot]) for cache in caches]
        keep = self.prefix is not None
        slot = seq.slot
        for filler in (self.num_decoding - 1 if seq.status is Status.DECODE else slot, len(self.slots) - 1):
            if filler != slot:
                self._move(filler, slot, keep)
                slot = filler
        for cache in caches:
            cache.free(slot)  # the last active slot: no move
        self.slots.pop()
        if keep:
            self.prefix.keep(slot, seq, lens)
        seq.status, seq.slot = Status.FINISHED, -1

    def _move(self, src: int, dst: int, swap: bool = False) -> None:
        for cache in (self.cache, *self.mirrors):
            if swap:
                length = max(int(cache.lens[src]), int(cache.lens[dst]))
                cache.swap(src, dst, length)
                cache.lens[[src, dst]] = cache.lens[[dst, src]]
            else:
                cache.move(src, dst)
        self._move_record(src, dst)

    def _move_record(self, src: int, dst: int) -> None:
        self.slots[dst] = self.slots[src]
        self.slots[dst].slot = dst
