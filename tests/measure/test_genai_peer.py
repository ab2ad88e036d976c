"""GenAI's precision for an artifact's: the mapping from the manifest's weights, and the mismatch lines."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from graphopt.measure.genai_peer import PeerPrecision, artifact_peer_precision, peer_precision, peer_precisions


@pytest.mark.parametrize(("weights", "level", "expected"), [
    ("fp32", None, PeerPrecision("fp32")),
    ("int4 block 32 symmetric (awq)", None, PeerPrecision("int4", 32, 4)),
    ("int4 block 64 symmetric (rtn)", 0, PeerPrecision("int4", 64, 1)),  # 0 (unset) runs fp32 activations
    ("int8 block 32 symmetric", 4, PeerPrecision("int8", 32, 4)),
])
def test_matched_precisions(weights: str, level, expected: PeerPrecision) -> None:
    assert peer_precision(weights, level) == expected and expected.mismatch is None


def test_builder_arguments_and_cache_keys() -> None:
    int4 = PeerPrecision("int4", 32, 4)
    assert int4.builder_args() == ["-p", "int4", "-e", "cpu", "--extra_options", "block_size=32", "accuracy_level=4"]
    assert int4.key == "int4-b32-a4" and PeerPrecision("fp32").key == "fp32"  # fp32: the cache name it always had
    assert PeerPrecision("fp32").builder_args() == ["-p", "fp32", "-e", "cpu"]


@pytest.mark.parametrize(("weights", "precision", "says"), [
    ("int8 per-channel symmetric", "int8", "only in blocks"),
    ("fp8 e4m3 per-channel", "fp32", "no such CPU precision"),
    ("fp16", "fp32", "no such CPU precision"),
    ("gguf 210 Q4_1, 1 Q6_K kept exactly (int4/int8 blocks, zero-point 0, + block-minimum correction)", "int4",
     "nearest model is int4 block 32"),
    ("gptq 14 GPTQ_INT8 kept exactly (int4/int8 blocks, zero-point 0, + block-minimum correction)", "int8",
     "nearest model is int8 block 32"),
    ("awq 14 AWQ_INT4 kept exactly (int4/int8 blocks, zero-point 0, + block-minimum correction)", "int4",
     "keeps the AWQ file's quantization"),
])
def test_unavoidable_mismatches_are_named(weights: str, precision: str, says: str) -> None:
    peer = peer_precision(weights)
    assert peer.precision == precision and says in peer.mismatch and weights in peer.mismatch


def test_bench_results_name_each_peers_precision(tmp_path: Path) -> None:
    (tmp_path / "build-report.json").write_text(json.dumps({"pipeline": [
        {"name": "quantize-int4", "block_size": 64}, {"name": "lower-quant-ort-cpu", "accuracy_level": 1}]}))
    manifest = SimpleNamespace(precision={"weights": "int4 block 64 symmetric (awq)", "activations": "fp32"})
    assert artifact_peer_precision(tmp_path, manifest) == PeerPrecision("int4", 64, 1)
    out = peer_precisions(tmp_path, manifest, ["hf", "genai"])
    assert out["peer_precision"] == {"hf": "fp32", "genai": "int4"}
    assert out["genai_model"] == {"precision": "int4", "block_size": 64, "accuracy_level": 1, "mismatch": None}
    assert len(out["precision_mismatch"]) == 1 and out["precision_mismatch"][0].startswith("hf runs")
    fp8 = SimpleNamespace(precision={"weights": "fp8 e4m3 per-channel"})
    assert peer_precisions(tmp_path / "none", fp8, ["genai"])["precision_mismatch"][0].startswith("genai: ")
    assert peer_precisions(tmp_path, SimpleNamespace(precision={"weights": "fp32"}), ["hf", "genai"])[
        "precision_mismatch"] == []


def test_genai_logits_match_the_fp32_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GenAI's fp32 model of a tiny llama, run as a fidelity Logits callable, gives the PyTorch model's logits."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install onnxruntime-genai)")
    import numpy as np

    from graphopt import sources
    from graphopt.core.progress import QUIET
    from graphopt.measure.fidelity import evaluate, torch_logits
    from graphopt.measure.genai_peer import genai_logits, genai_model
    from tiny_models import VOCAB, make_tiny_model

    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    source = sources.resolve_source(str(make_tiny_model("llama", tmp_path / "hf")))
    reference = torch_logits(sources.load_causal_lm(source))
    candidate = genai_logits(genai_model(source, QUIET, PeerPrecision("fp32")))
    row = np.random.default_rng(0).integers(3, VOCAB, size=24)
    np.testing.assert_allclose(candidate(row), reference(row), atol=1e-4, rtol=0)
    fidelity = evaluate(candidate, reference, np.tile(row, 2), "tiny", seq_len=24)
    assert fidelity.kl_mean < 1e-6 and fidelity.top1_agreement == 1.0
