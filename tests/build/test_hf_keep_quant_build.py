"""graphopt build HF_DIR --keep-quant end to end, on tiny GPTQ (asymmetric, act-order: an input Gather per input
plus offset corrections) and AWQ "gemm" Llamas (tests/hf_quant_files.py), each loaded and traced once:
- the kept artifact's logits are the fp32 dequantized model's (KL ≤ 1e-4, the issue's bar, measured by the
  build's fidelity step against the PyTorch model; and through prefill and decode against the plain fp32 build);
- its weights are the checkpoint's own int4 grid: MatMulNBits bits=4 for every decoder projection, no fp32 MatMul
  left but the lm_head and the offset corrections, and a fraction of fp32's bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.build import quant as quant_build
from graphopt.build.artifact import BuildOptions, build_traced, load, trace_loaded
from graphopt.build.precision import PrecisionFlags, precision_recipe
from graphopt.core.progress import QUIET
from graphopt.passes.pipeline import load_recipe
from graphopt.runtime.engine import OrtEngine
from hf_quant_files import write_checkpoint
from tiny_models import VOCAB

CHECKPOINTS = {"gptq-act-order": dict(method="gptq", act_order=True), "awq": dict(method="awq")}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def built(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    write_checkpoint(root / "hf", **CHECKPOINTS[request.param])
    words = root / "words.txt"
    words.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(4, VOCAB, 400)))
    reports = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRAPHOPT_CACHE", str(root / "cache"))
        loaded = load(str(root / "hf"), "sdpa", QUIET)
        trace_loaded(loaded, QUIET)
        for name, recipe in (("fp32", load_recipe("ort-cpu")),
                             ("kept", precision_recipe(PrecisionFlags(keep_quant=True), None, "ort-cpu"))):
            options = BuildOptions(recipe, root / name, eval_text=words, eval_tokens=64)
            context = quant_build.context_for(options, loaded, QUIET)
            reports[name] = build_traced(loaded, options, QUIET, context, copy=True)
    return request.param, root, reports


def _steps(artifact: Path) -> list[np.ndarray]:
    engine = OrtEngine(artifact, max_slots=2, max_seq=32)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, size=n).tolist() for n in (5, 9)]
    for _ in prompts:
        engine.cache.allocate()
    steps = [engine.prefill(prompts, slots=[0, 1]).copy()]
    steps += [engine.decode(rng.integers(3, VOCAB, size=2)).copy() for _ in range(6)]
    return steps


def test_kept_artifact_gives_the_dequantized_logits(built) -> None:
    name, root, reports = built
    kept = reports["kept"]
    fidelity = kept["fidelity"]
    budget = {"kl_max": 1e-4, "top1_min": 0.999, "within": True, "misses": [],
              "from": f"{CHECKPOINTS[name]['method']} weights"}
    assert fidelity["kl_mean"] <= 1e-4 and fidelity["budget"] == budget, fidelity
    worst = max(float(np.abs(a - b).max()) for a, b in zip(_steps(root / "fp32"), _steps(root / "kept")))
    assert worst < 1e-4, worst
    method = CHECKPOINTS[name]["method"]
    assert kept["precision"]["weights"].startswith(f"{method} 14 {method.upper()}_INT4 kept exactly")


def test_kept_weights_are_the_int4_grid(built) -> None:
    name, root, reports = built
    stats = {p["name"]: p["stats"] for p in reports["kept"]["passes"]}["keep-quant"]
    method = CHECKPOINTS[name]["method"]
    assert stats[f"matmuls_{method}_int4"] == 14 and stats["offset_corrections"] == 14
    assert stats.get("reordered_inputs", 0) == (2 * 4 if name == "gptq-act-order" else 0)  # q/k/v, o, gate/up, down
    graph = onnx.load(str(root / "kept" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 2 * 5 and all(a.i == 4 for n in nbits for a in n.attribute if a.name == "bits")
    assert reports["kept"]["artifact_bytes"] < 0.6 * reports["fp32"]["artifact_bytes"]
