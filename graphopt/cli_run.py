"""CLI commands that run an artifact: generate and bench."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graphopt.errors import RuntimeInputError


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
@click.option("--max-seq", default=None, type=int, help="KV cache capacity per sequence (default: min(model, 4096)).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def generate(artifact, prompt, prompt_ids, chat, max_new_tokens, temperature, top_p, top_k, seed, max_seq, as_json):
    """Generate text from ARTIFACT for PROMPT."""
    from transformers import AutoTokenizer

    from graphopt.runtime.engine import OrtEngine
    from graphopt.runtime.generate import generate as run
    from graphopt.runtime.sampler import SamplingParams

    if (prompt is None) == (prompt_ids is None):
        raise RuntimeInputError("give either a PROMPT or --prompt-ids (exactly one)")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    engine = OrtEngine(artifact, max_slots=1, max_seq=max_seq)
    tokenizer = AutoTokenizer.from_pretrained(artifact / "tokenizer", local_files_only=True)
    ids = parse_prompt_ids(prompt_ids) if prompt_ids is not None else encode_prompt(tokenizer, prompt, chat)
    (result,) = run(engine, [ids], params)
    text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if as_json:
        click.echo(json.dumps({"text": text, "token_ids": result.token_ids, "prompt_tokens": len(ids),
                               "finish_reason": result.finish_reason, "ttft_ms": round(result.ttft_ms, 2),
                               "decode_tokens_per_s": round(result.decode_tokens_per_s, 2)}))
    else:
        click.echo(text)
        click.echo(f"[{len(result.token_ids)} tokens, TTFT {result.ttft_ms:.0f} ms, "
                   f"decode {result.decode_tokens_per_s:.1f} tok/s, {result.finish_reason}]", err=True)


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--vs", "peers", multiple=True, type=click.Choice(["hf", "genai"]), default=("hf",), show_default=True)
@click.option("--prompt-tokens", default=64, show_default=True)
@click.option("--new-tokens", default=128, show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Runs per engine; medians are reported.")
@click.option("--json", "as_json", is_flag=True)
def bench(artifact, peers, prompt_tokens, new_tokens, repeats, as_json):
    """Batch-1 TTFT and decode tok/s of ARTIFACT vs peers on the same weights, in the same run."""
    from graphopt.bench import print_bench, run_bench

    results = run_bench(artifact, list(peers), prompt_tokens, new_tokens, repeats)
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        print_bench(results)
