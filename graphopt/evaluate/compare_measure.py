"""What ``graphopt compare`` measures on each built artifact: fidelity against fp32 and speed on the artifact's engine.

Fidelity: the artifact's logits at every position of the evaluation rows against the fp32 PyTorch model the
trace came from (which matches the fp32 artifact within 1e-4); the reference logits are computed once per row
and shared by every recipe (:class:`ReferenceLogits`).

Speed, on one engine per artifact (``max_slots`` = the batch, cache = prompt + new tokens):

    batch 1   TTFT and decode tok/s of a greedy loop (graphopt.measure.bench.timed_loop, as ``graphopt bench``)
    batch B   B copies of the prompt prefilled in one call, then new_tokens − 1 batched decode steps;
              throughput = B · new_tokens / wall time (prefill included)

One warm-up per artifact, then ``repeats`` rounds that each time every artifact once (interleaved, with
graphopt.measure.bench.SETTLE_S idle before each run, so background load hits all alike); medians. Ratios to the
reference recipe of the same run are what the gate compares, never the absolute numbers.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.measure.fidelity import EVAL_SEQ, Logits, artifact_logits, evaluate, torch_logits
from graphopt.core.progress import Progress

SPEED_KEYS = ("ttft_ms", "decode_tokens_per_s", "batch_tokens_per_s")


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 3
    batch: int = 8
    threads: int | None = None


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


def time_artifacts(artifacts: dict[str, Path], prompt: list[int], settings: SpeedSettings,
                   progress: Progress) -> dict[str, dict[str, float]]:
    """Medians of TTFT, decode tok/s (batch 1) and batch-B throughput per artifact, interleaved rounds."""
    from graphopt.measure.bench import SETTLE_S

    runners: dict[str, Callable[[], dict[str, float]]] = {}
    for name, path in artifacts.items():
        with progress.step(f"loading and warming up {name}"):
            runners[name] = _runner(path, prompt, settings)
            runners[name]()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    rounds = f"{settings.repeats} round(s) of batch 1 and batch {settings.batch}, {settings.new_tokens} tokens"
    with progress.bar(f"timing {len(runners)} artifact(s): {rounds}", total=settings.repeats * len(runners)) as step:
        for _ in range(settings.repeats):
            for name, run in runners.items():
                time.sleep(SETTLE_S)
                samples[name].append(run())
                step(1)
    return {name: {key: round(statistics.median(s[key] for s in runs), 2) for key in SPEED_KEYS}
            for name, runs in samples.items()}


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


def relative(speed: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Ratios to the reference recipe, above 1 = better: decode and batch throughput ours/ref, TTFT ref/ours."""
    return {"decode": round(speed["decode_tokens_per_s"] / reference["decode_tokens_per_s"], 4),
            "batch": round(speed["batch_tokens_per_s"] / reference["batch_tokens_per_s"], 4),
            "ttft": round(reference["ttft_ms"] / speed["ttft_ms"], 4)}
