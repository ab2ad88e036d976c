"""What ``graphopt compare`` measures on each built artifact: fidelity against fp32 and speed on the artifact's engine.

Fidelity: the artifact's logits at every position of the evaluation rows against the fp32 PyTorch model the
trace came from (which matches the fp32 artifact within 1e-4); the reference logits are computed once per row
and shared by every recipe (:class:`ReferenceLogits`).

Speed, on one engine per artifact (``max_slots`` = the batch, cache = prompt + new tokens):

    batch 1   TTFT and decode tok/s of a greedy loop (graphopt.measure.bench.timed_loop, as ``graphopt bench``)
    batch B   B copies of the prompt prefilled in one call, then new_tokens − 1 batched decode steps;
              throughput = B · new_tokens / wall time (prefill included)

Before any timed engine a throwaway one is opened, run once and held until timing ends: on this project's
2-core test machines the first engine opened in a process sometimes ran 5–8% slower than later engines of
the same artifact for its whole life (4 engines of one artifact, 12 rounds each: the first one's median
0.924 of the mean, min–max 0.86–0.99, in one of two runs), which would read as a change between this run's
artifacts (opened first) and the baseline's.

One warm-up per artifact, then interleaved rounds that each time every artifact once (the order alternating
A B, B A, …, with graphopt.measure.bench.SETTLE_S idle before each run, so background load hits all alike),
until every ratio to the reference recipe is known to the requested precision or the time cap is hit
(graphopt.evaluate.intervals). Each figure is the median over rounds with its 95% interval; ratios to the
reference recipe of the same round are what the gate compares, never the absolute numbers. Given a
baseline run whose artifacts are still in its folder, each recipe's baseline artifact is timed in the same
rounds too, and the gate compares the two directly (``vs_baseline``): no shift between runs enters.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError
from graphopt.evaluate.intervals import CONFIDENCE, Interval, StopRule, median_interval, round_ratios
from graphopt.measure.fidelity import EVAL_SEQ, Logits, artifact_logits, evaluate, torch_logits
from graphopt.core.progress import Progress

log = logging.getLogger(__name__)
SPEED_KEYS = ("ttft_ms", "decode_tokens_per_s", "batch_tokens_per_s")
RATIO_KEYS = ("decode", "batch", "ttft")
Runner = Callable[[], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    prompt_tokens: int = 64
    new_tokens: int = 32
    batch: int = 8
    threads: int | None = None
    stop: StopRule = StopRule()


class ReferenceLogits:
    """The fp32 PyTorch model's logits per evaluation row, computed once and reused for every recipe."""

    def __init__(self, torch_model) -> None:
        self._run: Logits = torch_logits(torch_model)
        self._cache: dict[bytes, np.ndarray] = {}

    def __call__(self, row: np.ndarray) -> np.ndarray:
        key = row.astype(np.int64).tobytes()
        if key not in self._cache:
            self._cache[key] = self._run(row)
        return self._cache[key]


def measure_fidelity(candidate: Logits, reference: Logits, ids: np.ndarray, text: str, progress: Progress,
                     label: str) -> dict[str, Any]:
    """KL / top-1 / perplexities of ``candidate`` against ``reference`` over ``ids`` (rows of EVAL_SEQ)."""
    with progress.bar(f"{label}: fidelity vs fp32 on {ids.size} tokens", total=-(-ids.size // EVAL_SEQ)) as step:
        return evaluate(candidate, reference, ids, text, advance=step).to_json()


def artifact_fidelity(artifact: Path, reference: Logits, ids: np.ndarray, text: str,
                      progress: Progress) -> dict[str, Any]:
    return measure_fidelity(artifact_logits(artifact), reference, ids, text, progress, artifact.name)


BASELINE = " (baseline)"  # a baseline artifact's name among the timed ones


def time_artifacts(artifacts: dict[str, Path], prompt: list[int], settings: SpeedSettings,
                   progress: Progress, twins: dict[str, Path] | None = None) -> dict[str, Any]:
    """Every artifact timed in interleaved rounds until the ratios are precise enough; see :func:`summarise`.
    ``twins``: a baseline run's artifact per recipe, timed in the same rounds (see :func:`baseline_pairs`)."""
    from graphopt.measure.bench import SETTLE_S

    runners: dict[str, Runner] = {}
    with progress.step("opening a throwaway engine first (the first one opened in a process can run slower)"):
        first = next(iter(artifacts.values()))
        throwaway = _runner(first, prompt, settings)
        throwaway()
    for name, path in artifacts.items():
        with progress.step(f"loading and warming up {name}"):
            runners[name] = _runner(path, prompt, settings)
            runners[name]()
    for name, path in (twins or {}).items():
        try:
            with progress.step(f"loading and warming up {name}{BASELINE}"):
                runners[name + BASELINE] = _runner(path, prompt, settings)
                runners[name + BASELINE]()
        except GraphoptError as exc:  # e.g. built by another graphopt version: timed against stored ratios
            runners.pop(name + BASELINE, None)
            log.warning("the baseline's artifact %s is not timed beside this run's: %s", path, exc)
    rule = settings.stop
    label = (f"timing {len(runners)} artifact(s) in interleaved rounds (batch 1 and {settings.batch}, "
             f"{settings.new_tokens} tokens) until every ratio is within ±{rule.precision:.0%}, "
             f"at most {rule.time_cap_s:.0f} s")
    with progress.bar(label, total=rule.max_rounds) as step:
        samples, stopped, seconds = interleaved_rounds(runners, rule, step, settle_s=SETTLE_S)
    del throwaway  # held until here so that no timed engine reuses its memory
    pairs = baseline_pairs(samples)
    summary = summarise({name: runs for name, runs in samples.items() if not name.endswith(BASELINE)}, stopped,
                        seconds, rule)
    for name, paired in pairs.items():
        summary["recipes"][name]["vs_baseline"] = paired
    return summary


def baseline_pairs(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per recipe timed beside its baseline artifact: the change new/old of each figure (above 1 = better),
    one ratio per round (the two ran back to back under the same load), median and 95% interval. This is
    what the gate compares when it has it: a between-run shift of the machine cancels."""
    out = {}
    for name in (name for name in samples if name + BASELINE in samples):
        ratios = [round_ratios(old, new) for old, new in zip(samples[name + BASELINE], samples[name])]
        intervals = {key: median_interval([r[key] for r in ratios]) for key in RATIO_KEYS}
        out[name] = {"relative": {k: round(i.median, 4) for k, i in intervals.items()},
                     "relative_interval": {k: [round(i.low, 4), round(i.high, 4)] for k, i in intervals.items()},
                     "rounds": len(ratios)}
    return out


def interleaved_rounds(runners: dict[str, Runner], rule: StopRule, advance: Callable[[int], None] = lambda n: None,
                       settle_s: float = 0.0, clock: Callable[[], float] = time.perf_counter,
                       ) -> tuple[dict[str, list[dict[str, float]]], str, float]:
    """Rounds of every runner once (order alternating) until ``rule`` says stop: (samples, why, seconds)."""
    names = list(runners)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    start = clock()
    while True:
        for name in names if len(samples[names[0]]) % 2 == 0 else names[::-1]:
            time.sleep(settle_s)
            samples[name].append(runners[name]())
        advance(1)
        intervals = [i for ratios in ratio_intervals(samples).values() for i in ratios.values()]
        if stopped := rule.reason(intervals, len(samples[names[0]]), clock() - start):
            return samples, stopped, clock() - start


def ratio_intervals(samples: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Interval]]:
    """Per recipe after the first (the reference): each ratio's median and interval over the rounds."""
    names = list(samples)
    reference = samples[names[0]]
    out = {}
    for name in names[1:]:
        ratios = [round_ratios(ref, run) for ref, run in zip(reference, samples[name])]
        out[name] = {key: median_interval([r[key] for r in ratios]) for key in RATIO_KEYS}
    return out


def summarise(samples: dict[str, list[dict[str, float]]], stopped: str, seconds: float,
              rule: StopRule) -> dict[str, Any]:
    """{"recipes": {name: speed, speed_interval, speed_range (min–max over rounds), relative, relative_interval},
    "timing": how it ended}."""
    ratios = ratio_intervals(samples)
    recipes = {}
    for name, runs in samples.items():
        speed = {key: median_interval([run[key] for run in runs]) for key in SPEED_KEYS}
        relative = ratios.get(name) or {key: median_interval([1.0] * len(runs)) for key in RATIO_KEYS}
        recipes[name] = {"speed": {k: round(i.median, 2) for k, i in speed.items()},
                         "speed_interval": {k: [round(i.low, 2), round(i.high, 2)] for k, i in speed.items()},
                         "speed_range": {k: [round(min(run[k] for run in runs), 2), round(max(run[k] for run in runs), 2)]
                                         for k in SPEED_KEYS},
                         "relative": {k: round(i.median, 4) for k, i in relative.items()},
                         "relative_interval": {k: [round(i.low, 4), round(i.high, 4)] for k, i in relative.items()}}
    widest = max((i.half_width for r in ratios.values() for i in r.values()), default=0.0)
    return {"recipes": recipes,
            "timing": {"rounds": len(next(iter(samples.values()))), "seconds": round(seconds, 1), "stopped": stopped,
                       "short": stopped != "precision", "widest_half_width": round(widest, 4), "confidence": CONFIDENCE,
                       **dataclasses.asdict(rule)}}


def _runner(artifact: Path, prompt: list[int], settings: SpeedSettings) -> Callable[[], dict[str, float]]:
    from graphopt.measure.bench import timed_loop
    from graphopt.runtime.engine_api import open_engine

    engine = open_engine(artifact, max_slots=settings.batch, max_seq=len(prompt) + settings.new_tokens,
                       threads=settings.threads)

    def batch_one() -> tuple[float, float]:
        slot = engine.cache.allocate()
        try:
            run = timed_loop(lambda: int(engine.prefill([prompt], [slot])[0].argmax()),
                             lambda token: int(engine.decode([token])[0].argmax()), settings.new_tokens)
        finally:
            engine.cache.free_all()
        return run.ttft_ms, run.decode_tokens_per_s

    def batched() -> float:
        slots = [engine.cache.allocate() for _ in range(settings.batch)]
        try:
            start = time.perf_counter()
            tokens = engine.prefill([prompt] * settings.batch, slots).argmax(-1)
            for _ in range(settings.new_tokens - 1):
                tokens = engine.decode(tokens).argmax(-1)
            return settings.batch * settings.new_tokens / (time.perf_counter() - start)
        finally:
            engine.cache.free_all()

    def run() -> dict[str, float]:
        ttft_ms, decode = batch_one()
        return {"ttft_ms": ttft_ms, "decode_tokens_per_s": decode, "batch_tokens_per_s": batched()}

    return run
