"""Artifacts of tiny random llama / mistral / qwen2 / gpt2 match Hugging Face logits.

Batch 3 with different prompt lengths: one batched prefill, then 32 batched decode steps with
ragged caches; every step's logits are compared with HF's full-sequence forward (no cache).
Every build runs with --verify, which also checks each pass's logits against the stage before.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from graphopt.build.artifact import BuildOptions, build
from graphopt.passes.pipeline import load_recipe
from graphopt.core.progress import QUIET
from graphopt.runtime.engine import OrtEngine
from tiny_models import VOCAB, make_tiny_model

PROMPT_LENS = (5, 9, 3)
DECODE_STEPS = 32
TOLERANCE = 1e-4

CASES = {
    "llama": ("llama", "sdpa", {}),
    "llama-eager": ("llama", "eager", {}),
    "mistral": ("mistral", "sdpa", {}),
    "mistral-window": ("mistral", "sdpa", {"sliding_window": 6}),
    "qwen2": ("qwen2", "sdpa", {}),
    "gpt2": ("gpt2", "sdpa", {}),
    "gpt2-eager": ("gpt2", "eager", {}),
}


@pytest.fixture(scope="module", params=list(CASES))
def built(request, tmp_path_factory):
    arch, attn, overrides = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    source = make_tiny_model(arch, root / "hf", **overrides)
    options = BuildOptions(load_recipe("ort-cpu"), root / "artifact", verify=True, attn_implementation=attn)
    report = build(str(source), options, QUIET)
    hf = transformers.AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager").eval()
    return report, root / "artifact", hf


def _hf_logits(hf, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].numpy()


def test_prefill_and_decode_match_hf(built) -> None:
    _, artifact, hf = built
    engine = OrtEngine(artifact, max_slots=4, max_seq=64)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in PROMPT_LENS]
    for _ in prompts:
        engine.cache.allocate()
    logits = engine.prefill(prompts, slots=[0, 1, 2])
    sequences = [list(p) for p in prompts]
    steps = [logits.copy()]
    for _ in range(DECODE_STEPS):
        # feed random tokens (not argmax) so rows keep diverging and every position is exercised
        nxt = rng.integers(3, VOCAB, size=len(prompts))
        for seq, tok in zip(sequences, nxt):
            seq.append(int(tok))
        steps.append(engine.decode(nxt).copy())
    worst = 0.0
    for row, seq in enumerate(sequences):
        expected = _hf_logits(hf, seq)
        start = PROMPT_LENS[row] - 1
        got = np.stack([step[row] for step in steps])
        worst = max(worst, float(np.abs(got - expected[start:start + DECODE_STEPS + 1]).max()))
    assert worst <= TOLERANCE, f"max |logits - HF| = {worst:.3g}"


def test_graph_is_fused_and_verified(built) -> None:
    report, artifact, hf = built
    ops = report["ops"]["final"]
    layers = hf.config.num_hidden_layers
    assert ops.get("com.microsoft::GroupQueryAttention") == layers
    assert "Softmax" not in ops and "Attention" not in ops and "graphopt::FlashAttention" not in ops
    assert not any(op in ops for op in ("CumSum", "LessOrEqual", "Where"))  # the mask subgraph is gone
    assert report["unfused"] == []
    diffs = [p["max_abs_diff"] for p in report["passes"]]
    assert all(d is not None and d <= TOLERANCE for d in diffs)
    assert report["nodes"]["final"] < report["nodes"]["traced"]
