"""graphopt bench --draft/--speculative: speculative vs plain decoding of one artifact, in the same run.

Both sides are :class:`~graphopt.runtime.llm.LLM` over the same artifact (greedy, end tokens ignored):

    batch 1       one prompt, ``new_tokens`` tokens (the ``repeat`` task stops at the model's end token: past
                  its answer the model makes up new text, which no lookup can predict); decode tok/s
                  = (n − 1) / (last token − first token);
                  ``repeats`` interleaved rounds (plain, speculative, plain, ...), medians
    concurrency   ``concurrency`` prompts at once (the paragraph rotated by i tokens); total tok/s over the wall;
                  ``repeats`` interleaved rounds, medians

Greedy outputs must be identical (checked, reported). Next to the measured batch-1 speedup stands Leviathan
et al.'s prediction (1 − α^(k+1)) / ((1 − α)(ck + 1)) from this run's measured α (mean per-position acceptance
probability β), mean draft length k and cost ratio c = draft step / target decode step (the speculator's
measured draft step time over the plain run's time per token; for n-gram lookup, the lookup's time).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from graphopt.measure.bench import PROMPT_TEXT, SETTLE_S, benchmark_prompt, machine_info
from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.llm import LLM, Completion, load_tokenizer
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.spec_accept import leviathan_speedup
from graphopt.runtime.speculative import SpecConfig

REPEAT_REQUEST = "Repeat the following passage exactly, word for word, and nothing else:\n\n"


def bench_prompt(tokenizer: Any, task: str, prompt_tokens: int) -> list[int]:
    """``continue``: the English paragraph cut to ``prompt_tokens``; ``repeat``: a chat request to repeat it."""
    if task == "continue":
        return benchmark_prompt(tokenizer, prompt_tokens)
    text = REPEAT_REQUEST + PROMPT_TEXT
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return list(tokenizer(text + "\n\n")["input_ids"])


def _single(llm: LLM, prompt: list[int], new_tokens: int, to_eos: bool = False) -> tuple[Completion, float]:
    time.sleep(SETTLE_S)
    (done,) = llm.generate([prompt], SamplingParams(max_new_tokens=new_tokens, ignore_eos=not to_eos))
    return done, (len(done.token_ids) - 1) / max(done.latency_s - done.ttft_s, 1e-9)


def _concurrent(llm: LLM, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    done = llm.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return [c.token_ids for c in done], sum(len(c.token_ids) for c in done) / (time.perf_counter() - start)


def run_spec_bench(artifact: Path, spec: SpecConfig, task: str, prompt_tokens: int, new_tokens: int, repeats: int,
                   concurrency: int, threads: int | None = None) -> dict[str, Any]:
    """Time plain and speculative decoding of ``artifact``; a JSON-serialisable dict."""
    if new_tokens < 2 or repeats < 1 or concurrency < 0:
        raise RuntimeInputError("bench needs --new-tokens >= 2, --repeats >= 1 and --concurrency >= 0")
    slots, tokenizer = max(1, concurrency), load_tokenizer(Path(artifact))
    prompt = bench_prompt(tokenizer, task, prompt_tokens)
    max_seq = len(prompt) + new_tokens + 32  # a small cache: three engines' worth of KV fit comfortably
    plain = LLM(artifact, max_slots=slots, max_seq=max_seq, threads=threads, tokenizer=tokenizer)
    fast = LLM(artifact, max_slots=slots, max_seq=max_seq, threads=threads, tokenizer=tokenizer, speculative=spec)
    for llm in (plain, fast):  # warm-up
        _single(llm, prompt, 8)
    runs: dict[str, list] = {"plain": [], "speculative": []}
    for _ in range(repeats):
        for name, llm in (("plain", plain), ("speculative", fast)):
            runs[name].append(_single(llm, prompt, new_tokens, to_eos=task == "repeat"))
    result = _summary(runs, fast, spec)
    result |= {"artifact": str(artifact), "draft": str(spec.draft) if spec.draft else None, "method": spec.method,
               "max_k": spec.num_speculative_tokens, "adaptive": spec.adaptive, "task": task,
               "prompt_tokens": len(prompt), "new_tokens": len(runs["plain"][0][0].token_ids), "repeats": repeats,
               "machine": machine_info()}
    if concurrency > 1:
        result["concurrent"] = _concurrency(plain, fast, prompt, concurrency, new_tokens, repeats)
    return result


def _concurrency(plain: LLM, fast: LLM, prompt: list[int], concurrency: int, new_tokens: int,
                 repeats: int) -> dict[str, Any]:
    """``repeats`` interleaved rounds of ``concurrency`` requests at once, plain then speculative; medians."""
    prompts = [prompt[i:] + prompt[:i] for i in range(concurrency)]
    policy = fast.speculator.policy
    before = dict(policy.steps)
    runs = [[_concurrent(llm, prompts, new_tokens) for llm in (plain, fast)] for _ in range(repeats)]
    plain_rate = statistics.median(plain_run[1] for plain_run, _ in runs)
    spec_rate = statistics.median(spec_run[1] for _, spec_run in runs)
    return {"requests": concurrency, "plain_tokens_per_s": round(plain_rate, 2),
            "speculative_tokens_per_s": round(spec_rate, 2), "ratio": round(spec_rate / plain_rate, 3),
            "tokens_match": all(plain_run[0] == spec_run[0] for plain_run, spec_run in runs),
            "decode_steps": {outcome: count - before[outcome] for outcome, count in policy.steps.items()}}


def _summary(runs: dict[str, list], fast: LLM, spec: SpecConfig) -> dict[str, Any]:
    plain_rate = statistics.median(rate for _, rate in runs["plain"])
    spec_rate = statistics.median(rate for _, rate in runs["speculative"])
    seqs = [done for done, _ in runs["speculative"]]
    stats = [c.speculative or {} for c in seqs]
    rounds = sum(s.get("rounds", 0) for s in stats)
    proposed = sum(s.get("proposed", 0) for s in stats)
    accepted = sum(s.get("accepted", 0) for s in stats)
    alpha = sum(s.get("beta_sum", 0.0) for s in stats) / max(proposed, 1)
    mean_k = proposed / rounds if rounds else 0.0
    cost_ratio = fast.speculator.costs.estimate("draft", 1) * plain_rate  # draft step / plain decode step
    if spec.method == "ngram":  # one lookup per round, not per draft: spread it over the k drafts
        cost_ratio /= max(mean_k, 1.0)
    match = all(c.token_ids == runs["plain"][0][0].token_ids for c, _ in runs["plain"] + runs["speculative"])
    return {"plain_decode_tokens_per_s": round(plain_rate, 2), "speculative_decode_tokens_per_s": round(spec_rate, 2),
            "speedup": round(spec_rate / plain_rate, 3), "tokens_match": match,
            "acceptance_rate": round(accepted / max(proposed, 1), 4), "alpha": round(alpha, 4),
            "mean_accepted_length": round(accepted / rounds + 1, 3) if rounds else 0.0,
            "mean_k": round(mean_k, 3), "cost_ratio_c": round(cost_ratio, 4),
            "predicted_speedup": round(leviathan_speedup(alpha, mean_k, cost_ratio), 3) if rounds else None,
            "runs": {name: [round(rate, 2) for _, rate in values] for name, values in runs.items()},
            "measured_costs_ms": {kind: {size: round(seconds * 1e3, 3) for size, seconds in sorted(table.items())}
                                  for kind, table in fast.speculator.costs.times.items()}}


def print_spec_bench(r: dict[str, Any]) -> None:
    """A rich table: plain vs speculative decode tok/s, measured and predicted speedup, acceptance."""
    source = f"draft {r['draft']}" if r["draft"] else "n-gram lookup"
    fixed = "" if r["adaptive"] else " fixed"
    table = Table(title=f"{r['artifact']}: speculative ({source}, k ≤ {r['max_k']}{fixed}) vs plain, batch 1, "
                        f"{r['task']} task, {r['prompt_tokens']}-token prompt, {r['new_tokens']} greedy tokens, "
                        f"median of {r['repeats']}")
    for column in ("plain tok/s", "spec tok/s", "speedup", "predicted", "α", "accepted", "tokens/round", "k̄", "c",
                   "same tokens"):
        table.add_column(column, justify="right")
    predicted = "—" if r["predicted_speedup"] is None else f"{r['predicted_speedup']:.2f}"
    table.add_row(f"{r['plain_decode_tokens_per_s']:.1f}", f"{r['speculative_decode_tokens_per_s']:.1f}",
                  f"{r['speedup']:.2f}", predicted, f"{r['alpha']:.2f}", f"{r['acceptance_rate']:.0%}",
                  f"{r['mean_accepted_length']:.2f}", f"{r['mean_k']:.2f}", f"{r['cost_ratio_c']:.3f}",
                  "yes" if r["tokens_match"] else "NO")
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print("predicted = Leviathan et al. (1 − α^(k+1)) / ((1 − α)(ck + 1)) with this run's α, k̄ and c")
    if conc := r.get("concurrent"):
        console.print(f"{conc['requests']} concurrent requests: plain {conc['plain_tokens_per_s']:.1f} tok/s, "
                      f"speculative {conc['speculative_tokens_per_s']:.1f} tok/s (×{conc['ratio']:.2f}); decode steps "
                      f"{conc['decode_steps']}; same tokens: {'yes' if conc['tokens_match'] else 'NO'}")
    for kind, table in r["measured_costs_ms"].items():
        console.print(f"measured {kind} ms by {'k' if kind == 'verify' else 'batch'}: "
                      + ", ".join(f"{size}: {ms:.2f}" for size, ms in table.items()))
    machine = r["machine"]
    console.print(f"{machine['cpu']}, {machine['physical_cores']} physical cores, load avg {machine['load_avg_1m']}")
