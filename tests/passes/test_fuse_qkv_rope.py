"""fuse-qkv-rope: packed q/k/v + RoPE inside GroupQueryAttention matches the unfused artifact
on ragged batched prefill and decode (positions come from position_ids), fp32 and int4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graphopt.build.artifact import BuildOptions, build
from graphopt.passes.pipeline import PassSpec, load_recipe
from graphopt.core.progress import QUIET
from graphopt.runtime.engine import OrtEngine
from tiny_models import VOCAB, make_tiny_model

PROMPT_LENS = (5, 9, 3)


def _recipes(name: str):
    """The built-in recipe without 'fuse-qkv-rope', and with it right before the final cleanup."""
    recipe = load_recipe(name)
    passes = [spec for spec in recipe.passes if spec.name != "fuse-qkv-rope"]
    fused = (*passes[:-1], PassSpec("fuse-qkv-rope", {}), passes[-1])
    return recipe.__class__(name, recipe.target, tuple(passes)), recipe.__class__(f"{name}+fuse", recipe.target, fused)


def _run(artifact: Path, seed: int = 1) -> list[np.ndarray]:
    engine = OrtEngine(artifact, max_slots=4, max_seq=64)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in PROMPT_LENS]
    for _ in prompts:
        engine.cache.allocate()
    steps = [engine.prefill(prompts, slots=[0, 1, 2]).copy()]
    for _ in range(12):
        steps.append(engine.decode(rng.integers(3, VOCAB, size=3)).copy())
    return steps


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["ort-cpu", "ort-cpu-int4"])
def test_fused_artifact_matches_unfused(tmp_path: Path, recipe: str) -> None:
    source = make_tiny_model("llama", tmp_path / "hf")
    words = tmp_path / "words.txt"
    words.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(4, VOCAB, 600)))
    reports = {}
    for name, chosen in zip(("plain", "fused"), _recipes(recipe)):
        options = BuildOptions(chosen, tmp_path / name, calib_text=words if "int4" in recipe else None,
                               calib_tokens=512, eval_text=words, eval_tokens=128)
        reports[name] = build(str(source), options, QUIET)
    ops = reports["fused"]["ops"]["final"]
    assert "RotaryEmbedding" not in ops and ops["com.microsoft::GroupQueryAttention"] == 2
    fused_stats = next(p for p in reports["fused"]["passes"] if p["name"] == "fuse-qkv-rope")["stats"]
    assert fused_stats["rope_into_gqa"] == 2 and reports["fused"]["unfused"] == []
    assert reports["fused"]["nodes"]["final"] <= reports["plain"]["nodes"]["final"] - 2 * 4
    plain, fused = _run(tmp_path / "plain"), _run(tmp_path / "fused")
    worst = max(float(np.abs(a - b).max()) for a, b in zip(plain, fused))
    assert worst < 1e-4, worst
