"""SlotCache: allocation, compaction (last slot moves into a freed one), lengths and bound views. No model."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.kv_cache import SlotCache, SlotMove


def _cache(max_slots: int = 4, max_seq: int = 8) -> SlotCache:
    return SlotCache(num_layers=2, num_kv_heads=2, head_dim=3, max_slots=max_slots, max_seq=max_seq)


def _fill(cache: SlotCache, slot: int, length: int, value: float) -> None:
    for buf in (*cache.keys, *cache.values):
        buf[slot, :, :length] = value
    cache.advance(slot, length)


def test_allocate_in_order_until_full() -> None:
    cache = _cache(max_slots=3)
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    assert cache.num_free == 0
    with pytest.raises(RuntimeInputError, match="no free slot: 3 slots in use; raise max_slots or wait"):
        cache.allocate()


def test_free_moves_the_last_slot_into_the_freed_one() -> None:
    cache = _cache()
    for slot, (length, value) in enumerate([(2, 1.0), (3, 2.0), (5, 3.0)]):
        assert cache.allocate() == slot
        _fill(cache, slot, length, value)
    move = cache.free(1)
    assert move == SlotMove(src=2, dst=1)
    assert cache.num_active == 2
    assert cache.cache_lens().tolist() == [2, 5]
    for buf in (*cache.keys, *cache.values):
        assert (buf[1, :, :5] == 3.0).all()
        assert (buf[0, :, :2] == 1.0).all()
    assert cache.allocate() == 2 and cache.lens[2] == 0


def test_free_last_slot_moves_nothing() -> None:
    cache = _cache()
    cache.allocate()
    cache.allocate()
    assert cache.free(1) is None
    assert cache.num_active == 1
    with pytest.raises(RuntimeInputError, match="slot 1 is not active"):
        cache.free(1)


def test_prefix_view_is_the_buffer_itself() -> None:
    cache = _cache()
    views = cache.prefix_view(3)
    assert len(views) == 2
    for (key, value), key_buf, value_buf in zip(views, cache.keys, cache.values):
        assert key.shape == (3, 2, 8, 3) and key.flags["C_CONTIGUOUS"]
        assert key.ctypes.data == key_buf.ctypes.data and np.shares_memory(value, value_buf)
    key = cache.views(2, 1)[0][0]
    assert key.ctypes.data == cache.keys[0][2].ctypes.data and key.flags["C_CONTIGUOUS"]
    with pytest.raises(RuntimeInputError, match="outside the cache's 4 slots"):
        cache.views(3, 2)


def test_lengths_advance_truncate_and_limits() -> None:
    cache = _cache(max_seq=8)
    slot = cache.allocate()
    cache.advance(slot, 6)
    cache.advance_prefix(1)
    assert cache.lens[slot] == 7
    with pytest.raises(RuntimeInputError, match="would hold 9 tokens, over the cache's max_seq 8"):
        cache.advance(slot, 2)
    cache.truncate(slot, 4)
    assert cache.cache_lens().tolist() == [4]
    with pytest.raises(RuntimeInputError, match="cannot truncate"):
        cache.truncate(slot, 5)
    with pytest.raises(RuntimeInputError, match="decode over 2 slots"):
        cache.advance_prefix(2)
    cache.free_all()
    assert cache.num_active == 0 and not cache.lens.any()


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(RuntimeInputError, match="max_slots=0"):
        _cache(max_slots=0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_copy_rows_and_swap_between_any_slots(backend: str) -> None:
    """The prefix cache's row copies, on numpy buffers and on torch tensors (what the TensorRT engine's CUDA
    cache holds: the same slicing, ``clone`` for the swap's temporary), free slots included."""
    cache = SlotCache(num_layers=2, num_kv_heads=2, head_dim=3, max_slots=4, max_seq=8)
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(buf.shape).astype(np.float32) for buf in (*cache.keys, *cache.values)]
    if backend == "torch":
        torch = pytest.importorskip("torch")
        cache.keys = [torch.from_numpy(a.copy()) for a in start[:2]]
        cache.values = [torch.from_numpy(a.copy()) for a in start[2:]]
    else:
        cache.keys, cache.values = [a.copy() for a in start[:2]], [a.copy() for a in start[2:]]
    cache.copy_rows(0, 3, 5)  # slot 3 is free: allowed
    cache.swap(1, 2, 6)
    for before, buf in zip(start, (*cache.keys, *cache.values)):
        after = np.asarray(buf)
        np.testing.assert_array_equal(after[3, :, :5], before[0, :, :5])
        np.testing.assert_array_equal(after[3, :, 5:], before[3, :, 5:])  # the rest untouched
        np.testing.assert_array_equal(after[1, :, :6], before[2, :, :6])
        np.testing.assert_array_equal(after[2, :, :6], before[1, :, :6])
        np.testing.assert_array_equal(after[1, :, 6:], before[1, :, 6:])
    with pytest.raises(RuntimeInputError, match="cannot copy 9 cache rows"):
        cache.copy_rows(0, 1, 9)
    with pytest.raises(RuntimeInputError, match="slot 4"):
        cache.swap(0, 4, 1)
