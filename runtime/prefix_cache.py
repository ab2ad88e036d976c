"""Automatic prefix caching: a new request starts from the KV of the longest prefix already in a slot.

What the index knows, per slot of the slot cache (slot-major, active slots 0..n-1, free slots n..)::

    slots:  [ live 0 | live 1 | ... | live n-1 | kept n | kept n+1 | empty | ... ]
              a live sequence's cached tokens     finished sequences' tokens, kept while their slot is free

On admission (:meth:`PrefixCache.admit`, called by the scheduler before it allocates slot ``t = n``):

- the longest common prefix of the prompt with every live sequence's cached tokens and every kept entry is
  found (at most ``max_slots`` candidates: a numpy comparison each, microseconds; a radix tree would pay its
  bookkeeping on every token for no gain at this size). The prompt's last token is always prefilled (its
  logits are needed), and matches shorter than ``min_tokens`` are ignored (a row on top of a cache loses
  the batched prefill call, see engine.prefill);
- a kept entry the prompt wholly extends (the next turn of a chat) is *taken over*: its slot's rows are
  swapped into ``t`` (nothing when it already is ``t``), and the live sequence indexes those tokens from then on;
- otherwise the matched rows are copied into ``t`` (one in-place copy per layer of K and V, in the bound
  buffers, for the target's cache and every mirror: a draft model's cache keeps what it had seen);
- whatever entry was kept in ``t`` moves to an empty free slot, or over the least recently used entry, or
  is dropped if it is the least recently used itself (an eviction).

On release the scheduler swaps (rather than overwrites) slots so the finished sequence's rows end in the
first free slot, and :meth:`keep` records them. Every length is per cache: a draft cache may hold fewer
tokens than the target's (it catches up on what it has not seen when it next proposes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

import numpy as np

from graphopt.runtime.kv_cache import SlotCache
from graphopt.runtime.sequence import Sequence

MIN_TOKENS = 16  # shortest prefix worth reusing


@dataclasses.dataclass
class Kept:
    """A finished sequence's tokens held in a free slot: ``lens[i]`` positions valid in cache ``i``."""

    tokens: np.ndarray
    lens: tuple[int, ...]
    used: int  # admission tick of its last use (LRU)


@dataclasses.dataclass(frozen=True)
class Match:
    slot: int  # where the prefix is: a live slot, or a free slot with a kept entry
    length: int  # tokens reused
    kept: Kept | None  # the entry, when the prefix is a kept one


@dataclasses.dataclass
class PrefixStats:
    lookups: int = 0  # requests admitted
    hits: int = 0  # of which started from a cached prefix
    tokens_reused: int = 0
    prompt_tokens: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    """The prefix index over a slot cache and its mirrors, and the row copies that reuse it."""

    def __init__(self, caches: Seq[SlotCache], min_tokens: int = MIN_TOKENS) -> None:
        self.caches = tuple(caches)  # the target's cache first, then mirrors (a draft's)
        self.min_tokens = min_tokens
        self.kept: dict[int, Kept] = {}
        self.stats = PrefixStats()
        self._tick = 0

    # ---- admission ---------------------------------------------------------------------------------------
    def match(self, prompt: Seq[int], live: Seq[Sequence]) -> Match | None:
        """The longest reusable prefix of ``prompt`` among live sequences and kept entries (no side effects)."""
        ids = np.asarray(prompt, dtype=np.int64)
        best: Match | None = None
        candidates = [(seq.slot, np.asarray(seq.tokens()[:seq.num_cached]), None) for seq in live
                      if seq.num_cached >= self.min_tokens]
        candidates += [(slot, entry.tokens, entry) for slot, entry in self.kept.items()]
        for slot, tokens, entry in candidates:
            length = min(common_prefix(ids, tokens), len(ids) - 1)
            if length >= self.min_tokens and (best is None or length > best.length):
                best = Match(slot, length, entry)
        return best

    def admit(self, seq: Sequence, found: Match | None) -> None:
        """Ready slot ``t`` (the next to allocate) with ``found`` (:meth:`match` of ``seq``'s prompt, just made),
        allocate it in every cache, and record the reuse on ``seq`` (``num_cached``, ``num_reused``)."""
        self._tick += 1
        target = self.caches[0].num_active
        lens = self._prepare(target, found)
        for cache, length in zip(self.caches, lens):
            cache.allocate()
            cache.advance(target, length)
        seq.num_cached = seq.num_reused = lens[0]
        self.stats.lookups += 1
        self.stats.prompt_tokens += seq.num_prompt
        if lens[0]:
            self.stats.hits += 1
            self.stats.tokens_reused += lens[0]

    def _prepare(self, target: int, found: Match | None) -> tuple[int, ...]:
        """Copy or swap the matched rows into ``target``; returns the tokens reused per cache."""
        if found is None:
            self._vacate(target, spare=None)
            return (0,) * len(self.caches)
        lens = tuple(min(found.length, int(n)) for n in (found.kept.lens if found.kept else
                                                         (c.lens[found.slot] for c in self.caches)))
        whole = found.kept is not None and found.length == len(found.kept.tokens)
        if found.kept is not None and (whole or found.slot == target):  # take the entry over
            del self.kept[found.slot]
            if found.slot != target:
                self._swap(found.slot, target, found.kept)
            return lens
        self._vacate(target, spare=found.slot)
        for cache, length in zip(self.caches, lens):
            cache.copy_rows(found.slot, target, length)
        if found.kept is not None:
            found.kept.used = self._tick
        return lens

    def _vacate(self, target: int, spare: int | None) -> None:
        """Move the entry kept in ``target`` out of the way (never over ``spare``, the slot about to be copied
        from): into an empty free slot, over the least recently used entry, or drop it if it is that one."""
        entry = self.kept.pop(target, None)
        if entry is None:
            return
        free = range(self.caches[0].num_active + 1, self.caches[0].max_slots)
        empty = [slot for slot in free if slot not in self.kept and slot != spare]
        if not empty:
            victims = [slot for slot in free if slot in self.kept and slot != spare
                       and self.kept[slot].used < entry.used]
            if not victims:
                self.stats.evictions += 1
                return
            empty = [min(victims, key=lambda slot: self.kept[slot].used)]
            del self.kept[empty[0]]
            self.stats.evictions += 1
        for cache, length in zip(self.caches, entry.lens):
            cache.copy_rows(target, empty[0], length)
        self.kept[empty[0]] = entry

    def _swap(self, slot: int, target: int, taken: Kept) -> None:
        """Exchange rows of ``slot`` (the entry being taken over) and ``target`` (maybe another kept entry)."""
        other = self.kept.pop(target, None)
        for i, cache in enumerate(self.caches):
            cache.swap(slot, target, max(taken.lens[i], other.lens[i] if other else 0))
        if other is not None:
            self.kept[slot] = other

    # ---- release -----------------------------------------------------------------------------------------
    def keep(self, slot: int, seq: Sequence, lens: Seq[int]) -> None:
        """Index a released sequence whose rows now sit in free slot ``slot`` (``lens`` per cache)."""
        tokens = seq.tokens()[:min(seq.num_cached, int(lens[0]))]  # a speculative round cut short by a stop
        if len(tokens) < self.min_tokens:  # may have cached drafts past the last token it emitted
            return
        self.kept[slot] = Kept(np.asarray(tokens, dtype=np.int64), tuple(min(int(n), len(tokens)) for n in lens),
                               self._tick)

    def clear(self) -> None:
        self.kept.clear()


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
