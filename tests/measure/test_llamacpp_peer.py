"""graphopt bench --vs llamacpp: llama.cpp on the artifact's source GGUF.

Without llama-cpp-python (CI: PyPI has it as source only, ~6 min of compiling) the refusals and the precision
labels are tested; with it, a tiny Q4_1 GGUF's --keep-quant artifact is timed against llama.cpp and llama.cpp's
logits are compared with the artifact's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from gguf_quant_files import write_quantized_gguf
from graphopt.core.errors import BenchError
from graphopt.core.progress import QUIET
from graphopt.measure.bench import run_bench
from graphopt.measure.fidelity import artifact_logits, evaluate
from graphopt.measure.llamacpp_peer import (llama_calls, llamacpp_logits, llamacpp_precision, open_llama,
                                            with_llamacpp)
from tiny_models import make_tiny_model

LAYERS = 2  # tests/gguf_quant_files.py's tiny Llama: 7 projections a layer, plus the head (``output``)


def test_llamacpp_needs_a_gguf_source(tmp_path: Path) -> None:
    from graphopt.build.artifact import BuildOptions, build
    from graphopt.passes.pipeline import load_recipe

    hf_dir = make_tiny_model("llama", tmp_path / "hf")
    build(str(hf_dir), BuildOptions(load_recipe("ort-cpu"), tmp_path / "artifact"), QUIET)
    with pytest.raises(BenchError, match=r"--vs llamacpp runs the artifact's source GGUF, but '.*' is not a GGUF"):
        run_bench(tmp_path / "artifact", ["llamacpp"], 8, 4, 1, progress=QUIET)


def test_llamacpp_missing_binding_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(BenchError, match=r"needs llama.cpp's Python binding: pip install llama-cpp-python"):
        open_llama(tmp_path / "x.gguf", 1, 64)


def test_llamacpp_precision_and_mismatch(tmp_path: Path) -> None:
    gguf = write_quantized_gguf(tmp_path / "q4_1.gguf", "Q4_1", embedding="Q8_0")
    label = llamacpp_precision(gguf)
    assert label == f"gguf {LAYERS * 7 + 1} Q4_1, 1 Q8_0"
    kept = f"gguf {LAYERS * 7 + 1} Q4_1, 1 Q8_0 kept exactly (int4/int8 blocks, zero-point 0, + block-minimum correction)"
    for weights, mismatches in ((kept, 0), ("int4 block 32 (AWQ)", 1), ("fp32", 1)):
        got = with_llamacpp({"precision": weights, "peer_precision": {}, "precision_mismatch": []}, gguf)
        assert got["peer_precision"] == {"llamacpp": label}
        assert len(got["precision_mismatch"]) == mismatches
        assert all("build with --keep-quant" in line for line in got["precision_mismatch"])
    untouched = {"precision": "fp32", "peer_precision": {}, "precision_mismatch": []}
    assert with_llamacpp(dict(untouched), None) == untouched


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (PyPI has source only; pip install "
                                            "llama-cpp-python compiles llama.cpp, ~6 min on 2 cores)")
    from graphopt.build.artifact import BuildOptions, build
    from graphopt.build.precision import PrecisionFlags, precision_recipe

    root = tmp_path_factory.mktemp("llamacpp")
    gguf = write_quantized_gguf(root / "tiny-q4_1.gguf", "Q4_1", embedding="Q8_0")
    words = root / "words.txt"
    words.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(4, 200, 400)))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRAPHOPT_CACHE", str(root / "cache"))
        recipe = precision_recipe(PrecisionFlags(keep_quant=True), None, "ort-cpu")
        build(str(gguf), BuildOptions(recipe, root / "kept", eval_text=words, eval_tokens=64), QUIET)
    return gguf, root / "kept"


def test_bench_vs_llamacpp_same_weights(kept: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    gguf, artifact = kept
    monkeypatch.setenv("GRAPHOPT_CACHE", str(artifact.parent / "cache"))
    results = run_bench(artifact, ["llamacpp"], 8, 6, 2, progress=QUIET, threads=1)
    assert set(results["engines"]) == {"graphopt", "llamacpp"}
    assert results["engines"]["llamacpp"]["decode_tokens_per_s"] > 0
    assert len(results["engines"]["llamacpp"]["runs"]) == 2
    assert results["peer_precision"]["llamacpp"] == llamacpp_precision(gguf)
    assert results["precision_mismatch"] == []  # a --keep-quant artifact holds the GGUF's own blocks
    assert results["ratios"]["decode_vs_llamacpp"] > 0
    assert "llama-cpp-python" in results["versions"]


def test_llamacpp_logits_agree_with_the_kept_artifact(kept: tuple[Path, Path]) -> None:
    """The same blocks in both engines: llama.cpp's 8-bit activations move the logits a little, no more."""
    gguf, artifact = kept
    ids = np.random.default_rng(2).integers(4, 200, 48)
    fidelity = evaluate(llamacpp_logits(gguf, 1, 16), artifact_logits(artifact, 16), ids, "random ids", seq_len=16)
    assert fidelity.tokens == 45
    assert fidelity.kl_mean < 0.01 and fidelity.top1_agreement > 0.9


def test_llamacpp_greedy_loop_follows_its_own_logits(kept: tuple[Path, Path]) -> None:
    """bench's llama.cpp loop picks the argmax of llama.cpp's last-position logits at every step: the same
    tokens as an argmax over its logits for the whole sequence (a loop reading zeros would give token 0)."""
    gguf, _ = kept
    first, step = llama_calls(open_llama(gguf, 1, 32))
    prompt = [int(t) for t in np.random.default_rng(3).integers(4, 200, 8)]
    tokens = [first(prompt)]
    while len(tokens) < 8:
        tokens.append(step(tokens[-1]))
    logits = llamacpp_logits(gguf, 1, 32)(np.array(prompt + tokens[:-1]))
    assert tokens == [int(t) for t in logits[len(prompt) - 1:].argmax(-1)]
    assert len(set(tokens)) > 1
