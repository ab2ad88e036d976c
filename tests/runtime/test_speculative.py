"""Speculative decoding on tiny random llama artifacts: greedy exactness, rollback, sampling distribution."""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from graphopt.runtime import spec_accept, speculative
from graphopt.runtime.engine import OrtEngine
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.spec_accept import dense_probs
from graphopt.runtime.speculative import SpecConfig
from serving_artifact import tiny_artifact
from test_speculative_accept import chi_square_pvalue
from tiny_models import make_tiny_model

GREEDY = SamplingParams(max_new_tokens=14, ignore_eos=True)


@functools.lru_cache(maxsize=None)
def draft_artifact(noise: float) -> Path:
    """The serving artifact's model (same seed) with Gaussian noise on its weights: a draft that agrees in part."""
    import transformers

    from graphopt.build.artifact import BuildOptions, build
    from graphopt.passes.pipeline import load_recipe
    from graphopt.core.progress import QUIET

    root = Path(tempfile.mkdtemp(prefix="graphopt-draft-"))
    hf_dir = make_tiny_model("llama", root / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    model.save_pretrained(hf_dir)
    build(str(hf_dir), BuildOptions(load_recipe("ort-cpu"), root / "artifact"), QUIET)
    return root / "artifact"


@pytest.fixture(scope="module")
def target() -> Path:
    return tiny_artifact()


@pytest.fixture(scope="module")
def draft() -> Path:
    return draft_artifact(0.5)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(4, 96, size=n).tolist() for n in (2, 7, 19, 33)]


@pytest.fixture(scope="module")
def reference(target: Path, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens without speculation."""
    return [c.token_ids for c in LLM(target, max_slots=4, threads=1).generate(prompts, GREEDY)]


def _llm(target: Path, max_slots: int = 4, **spec) -> LLM:
    return LLM(target, max_slots=max_slots, threads=1, speculative=SpecConfig(**({"adaptive": False} | spec)))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_greedy_speculative_equals_plain(target, draft, prompts, reference, k: int) -> None:
    for spec in ({"draft": draft}, {"draft": target}, {"method": "ngram"}):
        llm = _llm(target, num_speculative_tokens=k, **spec)
        assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == reference, spec  # batch 4, ragged
        assert any(kind.startswith("verify_batch.") for kind in llm.speculator.costs.times), spec  # one call
        assert llm.generate([prompts[2]], GREEDY)[0].token_ids == reference[2], spec  # batch 1
        assert llm.engine.cache.num_active == 0
    stats = _llm(target, num_speculative_tokens=k, draft=target).generate(prompts, GREEDY)[0].speculative
    assert stats["acceptance_rate"] == 1.0 and stats["mean_accepted_length"] == pytest.approx(k + 1, rel=0.25)


def test_artifact_without_multi_token_graph_verifies_per_row(target, draft, prompts, reference,
                                                            tmp_path) -> None:
    """An artifact built before model_verify.onnx existed: one target call per speculating row, same output."""
    legacy = tmp_path / "legacy"
    shutil.copytree(target, legacy)
    (legacy / "model_verify.onnx").unlink()
    manifest = json.loads((legacy / "manifest.json").read_text())
    del manifest["graphs"], manifest["files"]["model_verify.onnx"]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    for spec in ({"draft": draft}, {"method": "ngram"}):
        llm = _llm(legacy, num_speculative_tokens=3, **spec)
        assert not llm.engine.multi_token
        assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == reference, spec
        assert "verify" in llm.speculator.costs.times, spec
        assert not any(kind.startswith("verify_batch.") for kind in llm.speculator.costs.times), spec
    adaptive = LLM(legacy, max_slots=4, threads=1, speculative=SpecConfig(draft=draft, num_speculative_tokens=3))
    assert [c.token_ids for c in adaptive.generate(prompts, GREEDY)] == reference


def test_multi_token_graph_onnxruntime_refuses_falls_back_per_row(target, prompts, reference, monkeypatch,
                                                                  caplog) -> None:
    """An onnxruntime that cannot load model_verify.onnx (no opset-24 Attention): a warning, then per-row calls."""
    from graphopt.runtime import engine as engine_module

    create = engine_module.create_session

    def refuse_verify(path, *args, **kwargs):
        if Path(path).name == "model_verify.onnx":
            raise RuntimeError("Opset 24 is under development and support for this is limited")
        return create(path, *args, **kwargs)

    monkeypatch.setattr(engine_module, "create_session", refuse_verify)
    llm = _llm(target, num_speculative_tokens=3, method="ngram")
    assert not llm.engine.multi_token and "cannot load model_verify.onnx" in caplog.text
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == reference
    assert not any(kind.startswith("verify_batch.") for kind in llm.speculator.costs.times)


def test_adaptive_greedy_and_logprobs(target, draft, prompts, reference) -> None:
    llm = LLM(target, max_slots=4, threads=1, speculative=SpecConfig(draft=draft, num_speculative_tokens=3))
    assert llm.speculator.costs.known()  # calibrated at start
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == reference
    # chunked prefill (12 tokens a step) next to speculating rows, whose k+1 tokens must fit the same budget
    chunked = LLM(target, max_slots=4, threads=1, max_batch_tokens=12,
                  speculative=SpecConfig(draft=draft, num_speculative_tokens=5, adaptive=False))
    assert [c.token_ids for c in chunked.generate(prompts, GREEDY)] == reference
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, logprobs=2, seed=1, ignore_eos=True)
    (done,) = _llm(target, num_speculative_tokens=3, draft=target).generate([prompts[1]], sampled)
    assert [lp.token_id for lp in done.logprobs] == done.token_ids and done.speculative["rounds"] > 0
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in done.logprobs)


def test_rollback_leaves_lengths_and_contents_right(target, draft, prompts) -> None:
    llm = _llm(target, num_speculative_tokens=4, draft=draft)
    seqs = [llm.add_request(p, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p in prompts]
    rejected = 0
    for _ in range(6):
        rejected += sum(o.num_drafted - o.num_accepted for o in llm.step())
    assert rejected > 0  # the noisy draft is wrong sometimes, so rollbacks happened
    reference = OrtEngine(target, max_slots=1, threads=1)
    for seq in seqs:
        lens = int(llm.engine.cache.lens[seq.slot])
        assert lens == seq.num_cached == seq.num_tokens - 1  # every token but the newest is cached
        assert llm.speculator.draft.engine.cache.lens[seq.slot] <= seq.num_tokens
        slot = reference.cache.allocate()
        reference.prefill([seq.tokens()[:lens]], [slot])
        for ours, theirs in zip(llm.engine.cache.keys + llm.engine.cache.values,
                                reference.cache.keys + reference.cache.values):
            np.testing.assert_allclose(ours[seq.slot, :, :lens], theirs[slot, :, :lens], atol=1e-5)
        reference.cache.free(slot)
    llm.abort_all()
    llm.step()


def _exact_joint(target: Path, prompt: list[int], params: SamplingParams, depth: int) -> dict[tuple, float]:
    """P(t_1..t_depth) of plain sampling, from the target's own logits (top-k keeps the tree small)."""
    engine = OrtEngine(target, max_slots=1, threads=1)
    joint: dict[tuple, float] = {(): 1.0}
    for _ in range(depth):
        grown = {}
        for prefix, mass in joint.items():
            slot = engine.cache.allocate()
            probs = dense_probs(engine.prefill([prompt + list(prefix)], [slot]), params)[0]
            engine.cache.free(slot)
            grown |= {prefix + (int(t),): mass * probs[t] for t in np.flatnonzero(probs)}
        joint = grown
    return joint


@pytest.mark.parametrize("mode", ["speculative", "point-mass", "plain", "broken"])
def test_sampling_distribution_matches_plain(target, draft, monkeypatch, mode: str) -> None:
    """Chi-square of (t1, t2, t3) over 1200 seeded requests vs the exact plain-sampling distribution.

    t1 comes from the prompt; t2, t3 from a verification round with 2 drafts of a noisy draft (some accepted,
    some rejected), or from the n-gram path with a point-mass draft (the lookup stubbed to propose [77, 10], a
    frequent continuation here). "plain" samples without speculation (checks the reference); "broken" accepts
    every draft — the test must catch it.
    """
    broken = mode == "broken"
    if mode == "point-mass":
        monkeypatch.setattr(speculative, "ngram_lookup", lambda tokens, k, *sizes: [77, 10][:k])
    if broken:
        def accept_all(drafts, q, p, uniforms):
            return spec_accept.Acceptance(list(drafts) + [0], len(drafts), len(drafts), (1.0,) * len(drafts))
        monkeypatch.setattr(speculative, "accept_sampled", accept_all)
    prompt, depth = [5, 17, 42], 3
    params = [SamplingParams(max_new_tokens=4, temperature=1.0, top_k=3, seed=i, ignore_eos=True) for i in range(1200)]
    if mode == "plain":
        results = LLM(target, max_slots=16, threads=1).generate([prompt] * len(params), params)
    else:
        llm = _llm(target, max_slots=16, num_speculative_tokens=2,
                   **({"method": "ngram"} if mode == "point-mass" else {"draft": draft}))
        results = llm.generate([prompt] * len(params), params)
        stats = [r.speculative for r in results]
        rejected = sum(s["proposed"] - s["accepted"] for s in stats)
        assert sum(s["accepted"] for s in stats) > 0 and (rejected > 0) != broken
    joint = _exact_joint(target, prompt, params[0], depth)
    cells = {key: i for i, key in enumerate(joint)}
    counts = np.zeros(len(cells) + 1)  # the last cell: sequences plain sampling cannot produce
    for result in results:
        counts[cells.get(tuple(result.token_ids[:depth]), len(cells))] += 1
    pvalue = chi_square_pvalue(counts, np.append(list(joint.values()), 0.0))
    print(f"{mode}: chi-square p = {pvalue:.3g} over {len(cells)} cells")
    assert (pvalue < 1e-6) if broken else (pvalue > 1e-3)
