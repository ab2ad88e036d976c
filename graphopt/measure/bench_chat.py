"""``graphopt bench ART --workload chat``: multi-turn chat traffic, where most of every prompt was seen before.

The workload (seeded, token ids, so every engine gets the same tokens)::

    8 conversations at once, each:  [512-token system prompt, shared by all] + user turn 1 → 64 tokens
                                    ... + answer + user turn 2 → 64 tokens ... 6 turns, turns of 32–96 tokens

A conversation's next turn is sent when its answer ends (turns are sequential, conversations concurrent);
answers are 64 greedy tokens, end tokens ignored. Engines, in one process, one run each per round, rounds
interleaved (``SETTLE_S`` idle before each run):

    graphopt                  LLM.step loop, prefix cache on (the default)
    graphopt-no-prefix-cache  the same with LLMConfig(prefix_cache=False): every turn re-prefilled from token 0
    genai                     ONNX Runtime GenAI (--vs genai), its best mode here: one generator per
                              conversation kept across turns (each turn appended to it, so its KV is reused),
                              the 8 generators stepped round-robin one token at a time in this thread
                              (GenAI cannot batch generators whose turns differ in length)

Per engine: TTFT (turn sent → its first token) p50/p95 and per turn, inter-token latency p50, generated
tokens/s over the run's wall time, and graphopt's prefix-cache hit rate. Ratios are how many times better
graphopt is (> 1 is better), from the medians over rounds, with the min–max of the per-round ratios.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import BenchError
from graphopt.core.manifest import load_manifest
from graphopt.core.progress import Progress
from graphopt.measure.bench import SETTLE_S, machine_info
from graphopt.runtime.engine import physical_cores

CONVERSATIONS, SYSTEM_TOKENS, TURNS, TURN_TOKENS, ANSWER_TOKENS = 8, 512, 6, (32, 96), 64


@dataclasses.dataclass(frozen=True)
class ChatWorkload:
    system: list[int]
    turns: list[list[list[int]]]  # conversation -> turn -> the user's tokens
    answer_tokens: int

    @property
    def longest(self) -> int:
        return max(len(self.system) + sum(map(len, turns)) + len(turns) * self.answer_tokens for turns in self.turns)


def chat_workload(vocab: int, seed: int = 0, conversations: int = CONVERSATIONS, system_tokens: int = SYSTEM_TOKENS,
                  turns: int = TURNS, answer_tokens: int = ANSWER_TOKENS,
                  turn_tokens: tuple[int, int] = TURN_TOKENS) -> ChatWorkload:
    rng = np.random.default_rng(seed)
    system = rng.integers(10, vocab, size=system_tokens).tolist()
    low, high = turn_tokens
    return ChatWorkload(system, [[rng.integers(10, vocab, size=int(rng.integers(low, high + 1))).tolist()
                                  for _ in range(turns)] for _ in range(conversations)], answer_tokens)


@dataclasses.dataclass
class ChatRun:
    ttft_s: list[list[float]]  # conversation -> turn
    itl_s: list[float]
    tokens: int
    wall_s: float
    answers: dict[tuple[int, int], list[int]]  # (conversation, turn) -> the answer's tokens
    hit_rate: float | None = None

    def summary(self) -> dict[str, float]:
        ttfts = [t for conv in self.ttft_s for t in conv]
        out = {"ttft_p50_ms": 1e3 * float(np.percentile(ttfts, 50)), "ttft_p95_ms": 1e3 * float(np.percentile(ttfts, 95)),
               "itl_p50_ms": 1e3 * float(np.percentile(self.itl_s, 50)), "tokens_per_s": self.tokens / self.wall_s}
        return out | ({"prefix_cache_hit_rate": self.hit_rate} if self.hit_rate is not None else {})


class _Clock:
    """Per-conversation turn timing: when the turn was sent, its token times."""

    def __init__(self, count: int) -> None:
        self.ttft: list[list[float]] = [[] for _ in range(count)]
        self.itl: list[float] = []
        self.sent = [0.0] * count
        self.last = [0.0] * count
        self.tokens = 0

    def token(self, conv: int, now: float, count: int = 1) -> None:
        if self.last[conv] < self.sent[conv]:  # the turn's first token
            self.ttft[conv].append(now - self.sent[conv])
        else:
            self.itl.append(now - self.last[conv])
        self.last[conv], self.tokens = now, self.tokens + count


def run_graphopt(llm: Any, workload: ChatWorkload) -> ChatRun:
    """The conversations through ``llm`` (an LLM), each turn added when the previous answer ends."""
    from graphopt.runtime.sampler import SamplingParams

    params = SamplingParams(max_new_tokens=workload.answer_tokens, ignore_eos=True)
    clock, running, answers = _Clock(len(workload.turns)), {}, {}
    if llm.scheduler.prefix is not None:
        llm.scheduler.prefix.clear()  # each run starts cold: no turn of an earlier run is cached
    stats = llm.scheduler.prefix.stats if llm.scheduler.prefix is not None else None
    before = dataclasses.replace(stats) if stats is not None else None
    start = time.perf_counter()

    def send(conv: int, turn: int, context: list[int]) -> None:
        prompt = context + workload.turns[conv][turn]
        running[llm.add_request(prompt, params).request_id] = (conv, turn, prompt)
        clock.sent[conv] = time.perf_counter()

    for conv in range(len(workload.turns)):
        send(conv, 0, workload.system)
    while running:
        for out in llm.step():
            conv, turn, prompt = running[out.request_id]
            clock.token(conv, out.time, len(out.token_ids))
            if out.finished:
                del running[out.request_id]
                answers[conv, turn] = list(out.seq.output_ids)
                if turn + 1 < len(workload.turns[conv]):
                    send(conv, turn + 1, prompt + list(out.seq.output_ids))
    wall = time.perf_counter() - start
    hit = None if stats is None else (stats.hits - before.hits) / max(stats.lookups - before.lookups, 1)
    return ChatRun(clock.ttft, clock.itl, clock.tokens, wall, answers, hit)


def run_genai(model: Any, workload: ChatWorkload) -> ChatRun:
    """One GenAI generator per conversation, turns appended to it, generators stepped round-robin."""
    import onnxruntime_genai as og

    count, clock = len(workload.turns), _Clock(len(workload.turns))
    generators, produced, turn, answers = [], [0] * count, [0] * count, {}
    for conv in range(count):
        params = og.GeneratorParams(model)
        total = len(workload.system) + sum(map(len, workload.turns[conv])) + len(workload.turns[conv]) * \
            workload.answer_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)  # end tokens masked
        generators.append(og.Generator(model, params))
    start = time.perf_counter()
    pending = [workload.system + workload.turns[conv][0] for conv in range(count)]
    clock.sent = [start] * count
    while any(t < len(workload.turns[c]) for c, t in enumerate(turn)):
        for conv, generator in enumerate(generators):
            if turn[conv] >= len(workload.turns[conv]):
                continue
            if pending[conv]:
                generator.append_tokens(np.asarray(pending[conv], dtype=np.int32))
                pending[conv] = []
            generator.generate_next_token()
            clock.token(conv, time.perf_counter())
            answers.setdefault((conv, turn[conv]), []).append(int(generator.get_next_tokens()[0]))
            produced[conv] += 1
            if produced[conv] == workload.answer_tokens:
                produced[conv], turn[conv] = 0, turn[conv] + 1
                if turn[conv] < len(workload.turns[conv]):
                    pending[conv] = workload.turns[conv][turn[conv]]
                    clock.sent[conv] = time.perf_counter()
    return ChatRun(clock.ttft, clock.itl, clock.tokens, time.perf_counter() - start, answers)


def run_chat_bench(artifact: Path, peers: list[str], repeats: int, threads: int | None = None,
                   progress: Progress | None = None, workload: ChatWorkload | None = None) -> dict[str, Any]:
    """Every engine once per round, ``repeats`` interleaved rounds after a warm-up; a JSON-serialisable dict."""
    from graphopt.measure.bench_batching import load_genai
    from graphopt.runtime.llm import LLM

    progress = progress or Progress()
    threads = threads or physical_cores()
    manifest = load_manifest(artifact)
    engines: dict[str, Any] = {}
    with progress.step("loading graphopt (prefix cache on and off)"):
        for name, cached in (("graphopt", True), ("graphopt-no-prefix-cache", False)):
            engines[name] = LLM(artifact, max_slots=CONVERSATIONS, threads=threads, prefix_cache=cached)
    workload = workload or chat_workload(engines["graphopt"].engine.vocab_size)
    if workload.longest > engines["graphopt"].max_seq:
        raise BenchError(f"the chat workload needs {workload.longest} tokens of context; this artifact's engine "
                         f"holds {engines['graphopt'].max_seq}; rebuild with a longer context")
    if "genai" in peers:
        engines["genai"] = load_genai(Path(artifact), threads, progress)  # at the artifact's precision, cached
    runs: dict[str, list[ChatRun]] = {name: [] for name in engines}
    with progress.step(f"chat workload: {len(engines)} engines x {repeats} interleaved rounds"):
        # every slot once (first use of a slot commits its cache pages: a one-off cost, not the workload's)
        warm = chat_workload(min(100, engines["graphopt"].engine.vocab_size), seed=1,
                             conversations=len(workload.turns), system_tokens=32, turns=1, answer_tokens=4)
        for name, engine in engines.items():
            _run(name, engine, warm)
        for _ in range(repeats):
            for name, engine in engines.items():
                time.sleep(SETTLE_S)
                runs[name].append(_run(name, engine, workload))
                gc.collect()
    return _report(manifest, artifact, workload, runs, threads, repeats, engines["graphopt"].engine.eos_token_ids)


def _run(name: str, engine: Any, workload: ChatWorkload) -> ChatRun:
    return run_genai(engine, workload) if name == "genai" else run_graphopt(engine, workload)


def _answers_equal(runs: dict[str, list[ChatRun]], eos: list[int]) -> dict[str, float]:
    """Share of turns whose greedy answer each engine's last run gives as graphopt's last did. Turns from a
    conversation's first end token on are left out: graphopt emits it (ignore_eos, as vLLM), GenAI masks it
    (min_length), so from there the two conversations differ by design."""
    ours, keys, ended = runs["graphopt"][-1].answers, [], set()
    for conv, turn in sorted(ours):
        ended |= {conv} if set(ours[conv, turn]) & set(eos) else set()
        keys += [] if conv in ended else [(conv, turn)]
    return {name: sum(engine_runs[-1].answers.get(key) == ours[key] for key in keys) / max(len(keys), 1)
            for name, engine_runs in runs.items() if name != "graphopt"}


def _report(manifest: Any, artifact: Path, workload: ChatWorkload, runs: dict[str, list[ChatRun]], threads: int,
            repeats: int, eos: list[int]) -> dict[str, Any]:
    engines: dict[str, dict[str, Any]] = {}
    for name, engine_runs in runs.items():
        each = [run.summary() for run in engine_runs]
        engines[name] = {key: round(statistics.median(r[key] for r in each), 4) for key in each[0]}
        engines[name]["ttft_per_turn_ms"] = [round(1e3 * statistics.median(
            statistics.median(run.ttft_s[c][t] for c in range(len(run.ttft_s))) for run in engine_runs), 2)
            for t in range(len(workload.turns[0]))]
        engines[name]["runs"] = [{k: round(v, 4) for k, v in r.items()} for r in each]
    ratios, spread = {}, {}
    for peer, suffix in (("graphopt-no-prefix-cache", "no_prefix_cache"), ("genai", "genai")):
        if peer not in runs:
            continue
        pairs = list(zip(runs["graphopt"], runs[peer]))
        ttft = [p.summary()["ttft_p50_ms"] / o.summary()["ttft_p50_ms"] for o, p in pairs]
        rate = [o.summary()["tokens_per_s"] / p.summary()["tokens_per_s"] for o, p in pairs]
        for key, values in ((f"ttft_p50_vs_{suffix}", ttft), (f"throughput_vs_{suffix}", rate)):
            ratios[key] = round(statistics.median(values), 3)
            spread[key] = [round(min(values), 3), round(max(values), 3)]
    same = _answers_equal(runs, eos)
    return {"workload": "chat", "model": manifest.source.id or Path(artifact).name, "repeats": repeats,
            "threads": threads, "conversations": len(workload.turns), "turns": len(workload.turns[0]),
            "system_tokens": len(workload.system), "answer_tokens": workload.answer_tokens, "engines": engines,
            "ratios": ratios, "ratio_min_max": spread, "answers_equal_graphopt": same, "machine": machine_info()}


def print_chat_bench(results: dict[str, Any]) -> None:
    """A rich table, one row per engine, then the ratios (how many times better graphopt is)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{results['model']}: chat, {results['conversations']} conversations x {results['turns']} "
                        f"turns, {results['system_tokens']}-token system prompt, {results['answer_tokens']} tokens "
                        f"per answer, {results['threads']} threads, median of {results['repeats']}")
    for column in ("engine", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "tok/s", "prefix hits"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for name, engine in results["engines"].items():
        hits = engine.get("prefix_cache_hit_rate")
        table.add_row(name, f"{engine['ttft_p50_ms']:.0f}", f"{engine['ttft_p95_ms']:.0f}",
                      f"{engine['itl_p50_ms']:.1f}", f"{engine['tokens_per_s']:.1f}",
                      "—" if hits is None else f"{hits:.0%}")
    console = Console(width=max(Console().width, 100))
    console.print(table)
    for key, value in results["ratios"].items():
        low, high = results["ratio_min_max"][key]
        console.print(f"{key}: {value:.2f}x (per round {low:.2f}–{high:.2f})")
    for name, share in results["answers_equal_graphopt"].items():
        console.print(f"greedy answers equal to graphopt's: {name} {share:.0%} of turns")


def plot_chat(results: dict[str, Any], path: Path) -> None:
    """TTFT per turn (median over conversations and rounds) for each engine, on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, engine in results["engines"].items():
        turns = range(1, len(engine["ttft_per_turn_ms"]) + 1)
        ax.plot(turns, engine["ttft_per_turn_ms"], marker="o", label=name)
    ax.set(xlabel="turn", ylabel="TTFT ms (median)", yscale="log",
           title=f"{results['model']}: chat workload, TTFT per turn")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
