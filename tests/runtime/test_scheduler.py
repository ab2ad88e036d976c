"""Scheduler: admission by slots and token budget, prefill/decode steps, chunked prefill, release. No model.

A fake engine writes each sequence's marker into the KV positions it fills, so the tests also check that
slot moves keep every sequence's cache with it.
"""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.core.errors import OverloadedError, RuntimeInputError
from graphopt.runtime.kv_cache import SlotCache
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.scheduler import Scheduler, SchedulerConfig, Step, StepKind
from graphopt.runtime.sequence import Sequence, Status


def _scheduler(slots: int = 4, max_seq: int = 64, budget: int = 16, queue: int = 32) -> Scheduler:
    cache = SlotCache(num_layers=1, num_kv_heads=1, head_dim=1, max_slots=slots, max_seq=max_seq)
    return Scheduler(cache, SchedulerConfig(max_batch_tokens=budget, max_queue=queue))


def _seq(index: int, prompt_len: int, max_new: int = 4) -> Sequence:
    return Sequence([5] * prompt_len, SamplingParams(max_new_tokens=max_new), request_id=f"r{index}")


def _marker(seq: Sequence) -> float:
    return float(seq.request_id[1:]) + 1


def _run(sched: Scheduler, step: Step) -> list[Sequence]:
    """Fake engine + postprocess: fill the cache, sample token 7, release sequences at max_new_tokens."""
    for seq, chunk in zip(step.seqs, step.chunks):
        start = seq.num_cached
        sched.cache.keys[0][seq.slot, 0, start:start + len(chunk), 0] = _marker(seq)
        sched.cache.advance(seq.slot, len(chunk))
    done = []
    for row in sched.complete(step):
        seq = step.seqs[row]
        seq.append(7)
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            seq.finish_reason = "length"
            done.append(seq)
    sched.release(done)
    _check_layout(sched)
    return done


def _check_layout(sched: Scheduler) -> None:
    cache = sched.cache
    assert cache.num_active == len(sched.slots)
    statuses = [seq.status for seq in sched.slots]
    decoding = statuses.count(Status.DECODE)
    assert statuses[:decoding] == [Status.DECODE] * decoding and statuses[decoding:] in ([], [Status.PREFILL])
    for slot, seq in enumerate(sched.slots):
        assert seq.slot == slot and cache.lens[slot] == seq.num_cached
        assert (cache.keys[0][slot, 0, : seq.num_cached, 0] == _marker(seq)).all()


def test_prefill_batch_fills_token_budget_and_free_slots() -> None:
    sched = _scheduler(slots=3, budget=16)
    for i in range(5):
        sched.add(_seq(i, 4))
    step = sched.schedule()
    assert step.kind is StepKind.PREFILL and [s.request_id for s in step.seqs] == ["r0", "r1", "r2"]
    assert step.slots == [0, 1, 2] and step.chunks == [[5] * 4] * 3
    _run(sched, step)
    assert [s.request_id for s in sched.waiting] == ["r3", "r4"]  # no free slot left
    step = sched.schedule()
    assert step.kind is StepKind.DECODE and step.chunks == [[7]] * 3

    budget = _scheduler(slots=8, budget=16)
    for i, n in enumerate([4, 4, 6, 2]):
        budget.add(_seq(i, n))
    first = budget.schedule()  # 2 rows x 4, then 3 rows x 6 = 18 > 16: the third waits
    assert [s.request_id for s in first.seqs] == ["r0", "r1"]


def test_long_prompt_is_chunked_and_alternates_with_decode() -> None:
    sched = _scheduler(slots=4, budget=16)
    sched.add(_seq(0, 3, max_new=20))
    _run(sched, sched.schedule())
    long = _seq(1, 40, max_new=2)
    sched.add(long)
    kinds = []
    for _ in range(7):
        step = sched.schedule()
        kinds.append((step.kind.value, step.num_tokens))
        _run(sched, step)
    assert kinds == [("decode", 1), ("prefill", 16), ("decode", 1), ("prefill", 16), ("decode", 1), ("prefill", 8),
                     ("decode", 2)]
    assert long.finished and long.num_cached == 41 and long.output_ids == [7, 7]
    assert [s.request_id for s in sched.slots] == ["r0"]


def test_waiting_prompts_join_only_after_the_chunked_one() -> None:
    sched = _scheduler(slots=4, budget=8)
    sched.add(_seq(0, 20))
    sched.add(_seq(1, 3))
    steps = []
    while True:
        step = sched.schedule()
        if step.kind is StepKind.DECODE:
            break
        steps.append([(s.request_id, len(c)) for s, c in zip(step.seqs, step.chunks)])
        _run(sched, step)
    assert steps == [[("r0", 8)], [("r0", 8)], [("r0", 4)]]
    step = sched.schedule()  # decode and prefill alternate
    assert step.kind is StepKind.PREFILL and step.seqs[0].request_id == "r1"


def test_finished_frees_slot_in_the_same_step_and_keeps_layout() -> None:
    sched = _scheduler(slots=4, budget=64)
    for i, max_new in enumerate([1, 3, 2]):
        sched.add(_seq(i, 4, max_new=max_new))
    done = _run(sched, sched.schedule())
    assert [s.request_id for s in done] == ["r0"] and done[0].status is Status.FINISHED and done[0].slot == -1
    assert [s.request_id for s in sched.slots] == ["r2", "r1"] and sched.cache.num_active == 2
    sched.add(_seq(3, 30, max_new=2))
    step = sched.schedule()  # the last step was a prefill: decode comes first, and r2 finishes
    assert step.kind is StepKind.DECODE
    assert [s.request_id for s in _run(sched, step)] == ["r2"] and [s.request_id for s in sched.slots] == ["r1"]
    _run(sched, sched.schedule())
    assert [s.request_id for s in sched.slots] == ["r1", "r3"]


def test_free_with_a_chunked_prefill_keeps_it_last() -> None:
    sched = _scheduler(slots=4, budget=8)
    for i in range(3):
        sched.add(_seq(i, 2, max_new=10))
    _run(sched, sched.schedule())
    sched.add(_seq(3, 30))
    _run(sched, sched.schedule())  # decode
    _run(sched, sched.schedule())  # first chunk of r3
    assert [s.status for s in sched.slots] == [Status.DECODE] * 3 + [Status.PREFILL]
    sched.abort(sched.slots[0])
    step = sched.schedule()  # r0's slot is freed first: r2 fills it, r3 moves to slot 2
    assert [s.request_id for s in sched.slots] == ["r2", "r1", "r3"]
    assert step.kind is StepKind.DECODE and [s.request_id for s in step.seqs] == ["r2", "r1"]
    _run(sched, step)


def test_cancel_waiting_and_running_requests() -> None:
    sched = _scheduler(slots=1)
    running, queued = _seq(0, 4, max_new=50), _seq(1, 4)
    sched.add(running)
    sched.add(queued)
    _run(sched, sched.schedule())
    assert sched.abort(queued) and sched.abort(running)
    assert not sched.abort(running)  # idempotent
    assert sched.cache.num_active == 1  # freed at the next schedule
    assert sched.schedule() is None
    assert sched.cache.num_active == 0 and not sched.waiting and not sched.has_work
    assert running.status is Status.FINISHED and running.finish_reason == "cancelled"


def test_queue_bound_and_requests_that_cannot_fit() -> None:
    sched = _scheduler(slots=1, max_seq=16, queue=2)
    sched.add(_seq(0, 4))
    sched.add(_seq(1, 4))
    with pytest.raises(OverloadedError, match="queue is full.*retry later"):
        sched.add(_seq(2, 4))
    with pytest.raises(RuntimeInputError, match=r"prompt 14 tokens \+ max_new_tokens 4 = 18, over the context limit"):
        _scheduler(max_seq=16).add(_seq(3, 14))
    with pytest.raises(RuntimeInputError, match="max_batch_tokens=0"):
        SchedulerConfig(max_batch_tokens=0)


def test_random_traffic_keeps_every_cache_with_its_sequence() -> None:
    rng = np.random.default_rng(0)
    sched = _scheduler(slots=5, max_seq=64, budget=12, queue=100)
    live: list[Sequence] = []
    finished = 0
    for index in range(400):
        if rng.random() < 0.3:
            seq = _seq(index, int(rng.integers(1, 30)), max_new=int(rng.integers(1, 12)))
            sched.add(seq)
            live.append(seq)
        if live and rng.random() < 0.05:
            sched.abort(live[int(rng.integers(len(live)))])
        step = sched.schedule()
        if step is not None:
            finished += len(_run(sched, step))
        live = [seq for seq in live if not seq.finished]
    while sched.has_work:
        _run(sched, sched.schedule())
    assert finished > 30 and sched.cache.num_active == 0 and not sched.slots
