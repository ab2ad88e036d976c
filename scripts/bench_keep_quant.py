"""--keep-quant against --int4 and llama.cpp on the same GGUF, in one run: decode speed and fidelity.

    .venv/bin/python scripts/bench_keep_quant.py ARTIFACT... [--model smollm2-135m] [--repeats 5] [--no-llamacpp]

Every artifact (graphopt's engine) and llama.cpp on the model's GGUF (llama-cpp-python; the artifacts'
source) run the same prompt through the same greedy loop with the same threads, in interleaved rounds
(``graphopt.measure.bench.measure``). Printed per engine: decode tok/s and TTFT, median and min–max, and the
decode ratio to the first ARTIFACT taken round by round (median, min–max). Fidelity is KL / top-1 against
the fp32 PyTorch model on the built-in corpus's evaluation split: each artifact's from its build report,
llama.cpp's measured here the same way (same rows, same reference). One JSON object goes to OUT if given.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from graphopt.core.progress import Progress
from graphopt.measure.bench import benchmark_prompt, graphopt_runner, llamacpp_runner, measure
from graphopt.measure.fidelity import EVAL_SEQ, evaluate, torch_logits
from graphopt.measure.llamacpp_peer import llamacpp_logits, llamacpp_precision
from graphopt.quant.text import EVAL_TOKENS, default_corpus, token_stream
from graphopt.runtime.engine import physical_cores
from graphopt.runtime.tokenizer import load_tokenizer
from graphopt.sources import load_causal_lm, resolve_source


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--model", default="smollm2-135m", help="the artifacts' source: a .gguf or a built-in name")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    progress, threads = Progress(), physical_cores()
    source = resolve_source(args.model)
    tokenizer = load_tokenizer(args.artifacts[0])
    prompt = benchmark_prompt(tokenizer, args.prompt_tokens)
    names = [f"{i}:{path.name}" for i, path in enumerate(args.artifacts)]
    factories = {name: (lambda path=path: graphopt_runner(path, threads)) for name, path in zip(names, args.artifacts)}
    fidelity = {name: json.loads((path / "build-report.json").read_text()).get("fidelity") or {}
                for name, path in zip(names, args.artifacts)}
    if not args.no_llamacpp:
        gguf = source.gguf_path
        factories["llamacpp"] = lambda: llamacpp_runner(gguf, threads, args.prompt_tokens + args.new_tokens)
        corpus = default_corpus("evaluation")
        ids = token_stream(tokenizer, corpus, EVAL_TOKENS, "eval")
        with progress.step("llama.cpp's KL against the fp32 model"):
            got = evaluate(llamacpp_logits(gguf, threads, EVAL_SEQ), torch_logits(load_causal_lm(source)), ids,
                           corpus.source)
        fidelity["llamacpp"] = got.to_json() | {"weights": llamacpp_precision(gguf)}
    runs, setup = measure(factories, prompt, args.new_tokens, args.repeats, progress)
    first = runs[names[0]]
    result = {"threads": threads, "repeats": args.repeats, "engines": {}}
    for name, engine_runs in runs.items():
        decode = [run.decode_tokens_per_s for run in engine_runs]
        ratio = [run.decode_tokens_per_s / base.decode_tokens_per_s for run, base in zip(engine_runs, first)]
        ttft = [run.ttft_ms for run in engine_runs]
        other = max(run.other_cpu_cores for run in engine_runs)
        result["engines"][name] = {"decode_tok_s": decode, "ttft_ms": ttft, "decode_ratio_to_first": ratio,
                                   "other_cpu_cores": other, "fidelity": fidelity.get(name, {})} | setup[name]
        kl = fidelity.get(name, {})
        print(f"{name:40s} decode {spread(decode)} tok/s  ×first {spread(ratio)}  TTFT {spread(ttft)} ms  "
              f"KL {kl.get('kl_mean', float('nan')):.6f} top-1 {kl.get('top1_agreement', float('nan')):.4f}  "
              f"other cores ≤ {other}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
