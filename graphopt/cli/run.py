"""CLI commands that run an artifact: generate and bench."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.config import MAX_SEQ_HELP


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RuntimeInputError(f"--prompt-ids {text!r} is not a comma-separated list of integers, e.g. 1,2,3") from None
    if not ids or min(ids) < 0:
        raise RuntimeInputError(f"--prompt-ids {text!r} must list at least one non-negative token id")
    return ids


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise RuntimeInputError("--chat: this model's tokenizer has no chat template; drop --chat")
        messages = [{"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    return list(tokenizer(prompt)["input_ids"])


def spec_options(command):
    """--draft / --speculative / --num-speculative-tokens / --fixed-k, shared by generate, serve and bench."""
    options = [
        click.option("--draft", type=click.Path(path_type=Path), default=None,
                     help="Speculative decoding with this draft artifact (same tokenizer, e.g. the --int4 build)."),
        click.option("--speculative", type=click.Choice(["ngram"]), default=None,
                     help="Speculative decoding by n-gram lookup in the prompt and output (no draft model)."),
        click.option("--num-speculative-tokens", "-k", "num_spec", default=4, show_default=True, type=int,
                     help="Most draft tokens per verification."),
        click.option("--fixed-k", is_flag=True, help="Always draft k tokens (no adaptive k or batch cut-off)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def spec_config(draft: Path | None, speculative: str | None, num_spec: int, fixed_k: bool,
                threads: int | None = None):
    """The SpecConfig the flags ask for, or None when speculation is off."""
    from graphopt.runtime.speculative import SpecConfig

    if draft is None and speculative is None:
        return None
    if draft is not None and speculative is not None:
        raise RuntimeInputError("give either --draft DRAFT or --speculative ngram, not both")
    if draft is not None and not (draft / "manifest.json").is_file():
        raise RuntimeInputError(f"--draft {draft} is not a graphopt artifact (no manifest.json); build one with "
                                "'graphopt build MODEL --int4 -o DIR'")
    if draft is not None:  # this process runs only graphopt engines: let target and draft share one pool
        from graphopt.runtime.engine import use_global_thread_pool

        use_global_thread_pool(threads)
    return SpecConfig(method="ngram" if speculative else "draft", num_speculative_tokens=num_spec, draft=draft,
                      adaptive=not fixed_k)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("--prompt-ids", default=None, help="Token ids instead of a prompt, e.g. 1,2,3.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--max-seq", default=None, type=int, help=MAX_SEQ_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@spec_options
def generate(artifact, prompt, prompt_ids, chat, max_new_tokens, temperature, top_p, top_k, seed, max_seq, as_json,
             draft, speculative, num_spec, fixed_k):
    """Generate text from ARTIFACT for PROMPT."""
    from graphopt.runtime.tokenizer import load_tokenizer

    from graphopt.runtime.sampler import SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise RuntimeInputError("give either a PROMPT or --prompt-ids (exactly one)")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    spec = spec_config(draft, speculative, num_spec, fixed_k)
    tokenizer = load_tokenizer(artifact)
    ids = parse_prompt_ids(prompt_ids) if prompt_ids is not None else encode_prompt(tokenizer, prompt, chat)
    result, stats = _run_generate(artifact, ids, params, max_seq, spec, tokenizer)
    text = tokenizer.decode(result["token_ids"], skip_special_tokens=True)
    if as_json:
        click.echo(json.dumps({"text": text, **result, "prompt_tokens": len(ids), "speculative": stats}))
        return
    click.echo(text)
    spec_line = (f", {stats['acceptance_rate']:.0%} of drafts accepted, {stats['mean_accepted_length']:.2f} "
                 "tokens per verification" if stats else "")
    click.echo(f"[{len(result['token_ids'])} tokens, TTFT {result['ttft_ms']:.0f} ms, "
               f"decode {result['decode_tokens_per_s']:.1f} tok/s, {result['finish_reason']}{spec_line}]", err=True)


def _run_generate(artifact, ids, params, max_seq, spec, tokenizer) -> tuple[dict, dict | None]:
    """One prompt through the LLM loop (with speculation when asked)."""
    from graphopt.runtime.llm import LLM

    (c,) = LLM(artifact, max_slots=1, max_seq=max_seq, tokenizer=tokenizer, speculative=spec).generate(ids, params)
    decode_s = c.latency_s - c.ttft_s
    rate = (len(c.token_ids) - 1) / decode_s if decode_s > 0 else 0.0
    return {"token_ids": c.token_ids, "finish_reason": c.finish_reason, "ttft_ms": round(c.ttft_s * 1e3, 2),
            "decode_tokens_per_s": round(rate, 2)}, c.speculative


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--vs", "peers", multiple=True, type=click.Choice(["hf", "genai", "llamacpp"]), default=("hf",),
              show_default=True, help="Peers timed in the same run (llamacpp: the source GGUF in llama.cpp).")
@click.option("--prompt-tokens", default=64, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Runs per engine; medians are reported.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--workload", type=click.Choice(["single", "chat"]), default="single", show_default=True,
              help="single: batch-1 TTFT and decode; chat: 8 concurrent multi-turn conversations sharing a "
                   "512-token system prompt (prefix cache on vs off, and --vs genai).")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="With --workload chat: write TTFT per turn for each engine to this PNG.")
@click.option("--concurrency", default=16, show_default=True, type=int,
              help="With speculation: also time this many concurrent requests, speculation on vs off.")
@click.option("--task", type=click.Choice(["continue", "repeat"]), default=None,
              help="With speculation: continue an English paragraph, or ask the chat model to repeat one "
                   "(default: repeat for --speculative ngram, continue otherwise; --prompt-tokens sets the "
                   "length of 'continue' only).")
@spec_options
def bench(artifact, peers, prompt_tokens, new_tokens, repeats, as_json, workload, plot_path, concurrency, task, draft,
          speculative, num_spec, fixed_k):
    """Batch-1 TTFT and decode tok/s of ARTIFACT vs peers on the same weights, in the same run.

    With --draft or --speculative: speculative vs plain decoding of ARTIFACT instead (no peers).
    With --workload chat: multi-turn chat traffic, prefix cache on vs off (and --vs genai)."""
    from graphopt.measure.bench import print_bench, run_bench

    if workload == "chat":
        _chat_bench(artifact, peers, repeats, as_json, plot_path)
        return
    if plot_path is not None:
        raise RuntimeInputError("--plot draws the chat workload; add --workload chat")
    spec = spec_config(draft, speculative, num_spec, fixed_k)
    if spec is not None:
        from graphopt.measure.bench_spec import print_spec_bench, run_spec_bench

        results = run_spec_bench(artifact, spec, task or ("repeat" if speculative else "continue"), prompt_tokens,
                                 new_tokens, repeats, concurrency)
        if as_json:
            click.echo(json.dumps(results, indent=2))
        else:
            print_spec_bench(results)
        return
    results = run_bench(artifact, list(peers), prompt_tokens, new_tokens, repeats)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        print_bench(results)


def _chat_bench(artifact: Path, peers: tuple[str, ...], repeats: int, as_json: bool, plot_path: Path | None) -> None:
    from graphopt.measure.bench_chat import plot_chat, print_chat_bench, run_chat_bench

    source = click.get_current_context().get_parameter_source("peers")
    if "hf" in peers and source is not click.core.ParameterSource.DEFAULT:
        raise RuntimeInputError("--vs hf has no chat mode (no batching, no KV reuse across turns); use --vs genai")
    if "llamacpp" in peers:
        raise RuntimeInputError("--vs llamacpp has no chat mode here (batch 1 only); use --vs genai")
    if repeats < 1:
        raise RuntimeInputError(f"--repeats {repeats} is too small; use at least 1")
    results = run_chat_bench(artifact, [peer for peer in peers if peer == "genai"], repeats)
    if plot_path is not None:
        plot_chat(results, plot_path)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        print_chat_bench(results)
        if plot_path is not None:
            click.echo(f"wrote {plot_path}")
