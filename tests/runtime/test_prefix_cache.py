"""Automatic prefix caching, first without a model: a fake engine writes each token's id into the KV position
it fills (in the target's cache and a mirror that lags behind, as a draft's does), so after every step every
live slot and every kept entry must hold exactly its tokens, whatever was copied, swapped or evicted."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.runtime.kv_cache import SlotCache
from graphopt.runtime.prefix_cache import MIN_TOKENS, PrefixCache, common_prefix
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.scheduler import Scheduler, SchedulerConfig, Step
from graphopt.runtime.sequence import Sequence


def _scheduler(slots: int, budget: int = 64, max_seq: int = 256) -> Scheduler:
    caches = [SlotCache(num_layers=2, num_kv_heads=1, head_dim=1, max_slots=slots, max_seq=max_seq)
              for _ in range(2)]
    return Scheduler(caches[0], SchedulerConfig(max_batch_tokens=budget), mirrors=(caches[1],), prefix_cache=True)


def _write(cache: SlotCache, seq: Sequence, upto: int) -> None:
    """The fake engine: positions lens..upto-1 of seq's slot get the ids of seq's tokens there."""
    start, tokens = int(cache.lens[seq.slot]), seq.tokens()
    for buf in (*cache.keys, *cache.values):
        buf[seq.slot, 0, start:upto, 0] = tokens[start:upto]
    cache.advance(seq.slot, upto - start)


def _run(sched: Scheduler, step: Step, rng: np.random.Generator) -> None:
    target, mirror = sched.cache, sched.mirrors[0]
    for seq, chunk in zip(step.seqs, step.chunks):
        _write(target, seq, seq.num_cached + len(chunk))
        if rng.random() < 0.5:  # the mirror catches up only some of the time (a draft between proposals)
            _write(mirror, seq, seq.num_cached + len(chunk))
    done = []
    for row in sched.complete(step):
        seq = step.seqs[row]
        seq.append(int(rng.integers(100, 200)))
        if len(seq.output_ids) >= seq.params.max_new_tokens:
            done.append(seq)
    sched.release(done)


def _check(sched: Scheduler) -> None:
    for cache in (sched.cache, *sched.mirrors):
        for seq in sched.slots:
            held = int(cache.lens[seq.slot])
            assert held <= seq.num_cached and (cache.keys[1][seq.slot, 0, :held, 0] == seq.tokens()[:held]).all()
    for slot, entry in sched.prefix.kept.items():
        assert slot >= sched.cache.num_active
        for cache, held in zip((sched.cache, *sched.mirrors), entry.lens):
            assert (cache.values[0][slot, 0, :held, 0] == entry.tokens[:held]).all()


@pytest.mark.parametrize("slots", [2, 3, 6])
def test_every_slot_and_kept_entry_holds_its_tokens(slots: int) -> None:
    """Random chats (shared system prompts, next turns extending earlier ones, unrelated prompts), cancellations
    mid-prefill, few slots so entries are evicted and relocated."""
    rng = np.random.default_rng(slots)
    sched = _scheduler(slots)
    systems = [rng.integers(1000, 2000, size=int(rng.integers(16, 80))).tolist() for _ in range(3)]
    finished: list[Sequence] = []
    live: list[Sequence] = []
    for i in range(150):
        base = finished[int(rng.integers(len(finished)))].tokens() if finished and rng.random() < 0.5 else \
            systems[int(rng.integers(3))] if rng.random() < 0.8 else []
        prompt = base + rng.integers(2000, 3000, size=int(rng.integers(1, 40))).tolist()
        seq = Sequence(prompt[:200], SamplingParams(max_new_tokens=int(rng.integers(1, 12))))
        sched.add(seq)
        live.append(seq)
        for _ in range(int(rng.integers(1, 6))):
            step = sched.schedule()
            if step is None:
                break
            _run(sched, step, rng)
            _check(sched)
            if rng.random() < 0.1 and sched.slots:
                sched.abort(sched.slots[-1])  # often the one mid-prefill
        finished += [seq for seq in live if seq.finished and seq.output_ids]
        live = [seq for seq in live if not seq.finished]
    while sched.has_work:
        _run(sched, sched.schedule(), rng)
        _check(sched)
    stats = sched.prefix.stats
    assert stats.hits > 50 and stats.tokens_reused > 2000 and stats.evictions > 0, stats


def test_a_next_turn_takes_the_finished_slot_over_and_a_common_prompt_is_copied() -> None:
    rng = np.random.default_rng(0)
    sched = _scheduler(slots=4)
    system = list(range(1000, 1000 + 3 * MIN_TOKENS))
    first = Sequence(system + [1, 2, 3], SamplingParams(max_new_tokens=4))
    sched.add(first)
    while sched.has_work:
        _run(sched, sched.schedule(), rng)
    assert list(sched.prefix.kept) == [0] and first.num_reused == 0
    turn = Sequence(first.tokens() + [7, 8], SamplingParams(max_new_tokens=2))
    others = [Sequence(system + [9, n], SamplingParams(max_new_tokens=2)) for n in range(3)]
    for seq in (turn, *others):
        sched.add(seq)
    step = sched.schedule()
    # the next turn takes slot 0 as it is; the others share the system prompt with nothing cached beyond it
    assert step.seqs == [turn, *others] and turn.num_reused == len(first.tokens()) - 1
    assert [seq.num_reused for seq in others] == [len(system)] * 3 and not sched.prefix.kept
    _run(sched, step, rng)
    _check(sched)


def test_rows_sharing_a_prompt_in_one_step_wait_for_the_first() -> None:
    """n > 1 (the same prompt several times): the first is prefilled, the rest start from its cache next step."""
    rng = np.random.default_rng(1)
    sched = _scheduler(slots=4)
    prompt = list(range(500, 540))
    copies = [Sequence(prompt, SamplingParams(max_new_tokens=3)) for _ in range(3)]
    for seq in copies:
        sched.add(seq)
    first = sched.schedule()
    assert first.seqs == copies[:1]
    _run(sched, first, rng)
    sched.schedule()  # a decode step for the first (prefill and decode alternate)
    step = sched.schedule()
    assert step.seqs == copies[1:] and [len(chunk) for chunk in step.chunks] == [1, 1]
    assert [seq.num_reused for seq in copies] == [0, 39, 39]


def test_short_prefixes_are_not_reused_and_common_prefix() -> None:
    cache = SlotCache(1, 1, 1, 2, 64)
    index = PrefixCache([cache])
    seq = Sequence(list(range(MIN_TOKENS - 1)) + [99], SamplingParams())
    index.admit(seq, index.match(seq.prompt_ids, []))
    seq.num_cached = seq.num_prompt
    assert index.match(list(range(MIN_TOKENS - 1)) + [5, 6], [seq]) is None  # 15 shared tokens: not worth it
    assert common_prefix(np.array([1, 2, 3]), np.array([1, 2])) == 2
    assert common_prefix(np.array([1]), np.array([2])) == 0
