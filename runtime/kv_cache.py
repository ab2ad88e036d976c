"""KV slot cache: one buffer per layer for K and V, a slot allocator, per-slot lengths.

Layout (slot-major BHSD)::

    keys[layer], values[layer]: [max_slots, Hkv, max_seq, D]
    lens: int32 [max_slots]            tokens held by each slot (the artifact's ``cache_lens``)

B slots, Hkv kv heads, max_seq cache positions, D head dim.

Active sequences always occupy slots ``0..num_active-1``, so the engine binds the contiguous
prefix ``[:n]`` of every buffer as ``past_*``/``present_*`` with no copy. Freeing slot ``i``
moves the last active slot's contents and length into ``i`` and returns that move, so the
caller can update its request→slot map. ``copy_rows`` and ``swap`` copy or exchange row ranges between any
two slots (free ones included: the prefix cache keeps finished sequences there). Pure numpy: no model
needed to test it.

Buffers are allocated with ``np.zeros`` (calloc): pages are committed only when touched. ORT's
GroupQueryAttention touches the whole bound range on its first call (measured: one 16-row prefill of
SmolLM2 with max_seq 2048 commits 1.3 GiB), so plan for ``max_slots x max_seq`` resident once all slots
have been used; it does not grow past that.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.core.errors import RuntimeInputError


@dataclasses.dataclass(frozen=True)
class SlotMove:
    """Slot ``src`` (the last active one) now lives in slot ``dst``."""

    src: int
    dst: int


class SlotCache:
    """Per-layer K/V slot buffers, lengths and a compacting slot allocator."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_seq: int,
        dtype: np.dtype | str = np.float32,
    ) -> None:
        if max_slots < 1:
            raise RuntimeInputError(f"max_slots={max_slots} is invalid; use 1 or more")
        if max_seq < 1:
            raise RuntimeInputError(f"max_seq={max_seq} is invalid; use 1 or more")
        shape = (max_slots, num_kv_heads, max_seq, head_dim)
        self.keys = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [np.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.lens = np.zeros(max_slots, dtype=np.int32)
        self.max_slots = max_slots
        self.max_seq = max_seq
        self.num_active = 0

    @property
    def num_free(self) -> int:
        return self.max_slots - self.num_active

    def allocate(self) -> int:
        """Take the next free slot (always ``num_active``), with an empty cache."""
        if self.num_active == self.max_slots:
            raise RuntimeInputError(
                f"no free slot: {self.max_slots} slots in use; raise max_slots or wait for a request to finish"
            )
        slot = self.num_active
        self.lens[slot] = 0
        self.num_active += 1
        return slot

    def free(self, slot: int) -> SlotMove | None:
        """Release ``slot``; move the last active slot into it. Returns the move, or None if none was needed."""
        self.check_active(slot)
        last = self.num_active - 1
        if slot != last:
            self.move(last, slot)
        self.lens[last] = 0
        self.num_active = last
        return None if slot == last else SlotMove(src=last, dst=slot)

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s cached tokens and length over slot ``dst`` (both must be active; src is kept)."""
        self.check_active(src)
        self.check_active(dst)
        length = int(self.lens[src])
        self.copy_rows(src, dst, length)
        self.lens[dst] = length

    def copy_rows(self, src: int, dst: int, length: int) -> None:
        """Copy cache positions ``0..length-1`` of slot ``src`` over slot ``dst``, in place in every layer's K and
        V buffer (free slots included: the prefix cache keeps finished sequences there). Lengths are the caller's."""
        self._check_rows(src, dst, length)
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange positions ``0..length-1`` of slots ``a`` and ``b`` (lengths are the caller's to swap)."""
        self._check_rows(a, b, length)
        for buf in (*self.keys, *self.values):
            held = _clone(buf[a, :, :length])
            buf[a, :, :length] = buf[b, :, :length]
            buf[b, :, :length] = held

    def _check_rows(self, src: int, dst: int, length: int) -> None:
        if not (0 <= src < self.max_slots and 0 <= dst < self.max_slots and 0 <= length <= self.max_seq):
            raise RuntimeInputError(f"cannot copy {length} cache rows from slot {src} to slot {dst}: the cache has "
                                    f"{self.max_slots} slots of {self.max_seq} positions")

    def free_all(self) -> None:
        self.lens[: self.num_active] = 0
        self.num_active = 0

    def cache_lens(self, n: int | None = None) -> np.ndarray:
        """Lengths of the first ``n`` slots (default: the active ones), a view."""
        return self.lens[: self.num_active if n is None else n]

    def advance(self, slot: int, count: int) -> None:
        """Record ``count`` more tokens written to ``slot``."""
        self.check_active(slot)
        self.check_room(slot, count)
        self.lens[slot] += count

    def advance_prefix(self, n: int) -> None:
        """Record one more token in each of slots ``0..n-1`` (a decode step)."""
        if n > self.num_active:
            raise RuntimeInputError(f"decode over {n} slots but only {self.num_active} are active; allocate first")
        self.lens[:n] += 1

    def truncate(self, slot: int, length: int) -> None:
        """Roll ``slot`` back to ``length`` tokens (speculative rejection): later positions get overwritten."""
        self.check_active(slot)
        if not 0 <= length <= self.lens[slot]:
            raise RuntimeInputError(f"cannot truncate slot {slot} to {length}: it holds {self.lens[slot]} tokens")
        self.lens[slot] = length

    def check_room(self, slot: int, count: int) -> None:
        if int(self.lens[slot]) + count > self.max_seq:
            raise RuntimeInputError(
                f"slot {slot} would hold {int(self.lens[slot]) + count} tokens, over the cache's max_seq "
                f"{self.max_seq}; raise max_seq (up to the artifact's limit) or use shorter prompts"
            )

    def views(self, first: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Contiguous (K, V) views of slots ``first..first+count-1`` per layer: [count, Hkv, max_seq, D]."""
        if first < 0 or count < 1 or first + count > self.max_slots:
            raise RuntimeInputError(
                f"slots {first}..{first + count - 1} are outside the cache's {self.max_slots} slots"
            )
        stop = first + count
        return [(k[first:stop], v[first:stop]) for k, v in zip(self.keys, self.values)]

    def prefix_view(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The contiguous ``[:n]`` views to bind as past/present for a batch of the first ``n`` slots."""
        return self.views(0, n)

    def check_active(self, slot: int) -> None:
        if not 0 <= slot < self.num_active:
            raise RuntimeInputError(
                f"slot {slot} is not active ({self.num_active} active slots: 0..{self.num_active - 1}); "
                "allocate it first"
            )


def _clone(rows):
    """A copy of a buffer slice: numpy's ``copy`` or torch's ``clone`` (the device cache's buffers)."""
    return rows.copy() if isinstance(rows, np.ndarray) else rows.clone()
