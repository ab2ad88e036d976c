"""TensorRT-RTX (CPU only) parses the trt artifacts of a tiny Llama and AOT-builds them for SM89 and SM120:
fp16, int8, fp8, int4 and the plugin form (inlined without the plugin). Any parser or builder error fails."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.targets.trt_aot import aot_check
from tiny_models import make_tiny_model
from trt_helpers import built

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'graphopt[trt]'; make test does)")

ARCHS = ["sm89", "sm120"]
CASES = [("trt", "standard"), ("trt-int8", "standard"), ("trt-fp8", "standard"), ("trt-int4", "standard"),
         ("trt", "plugin")]


@pytest.mark.parametrize("recipe,attention", CASES, ids=[f"{r}-{a}" for r, a in CASES])
def test_parses_and_aot_builds(recipe: str, attention: str) -> None:
    artifact = built(recipe, "llama", attention)
    results = aot_check(artifact, ARCHS)
    assert [r.arch for r in results] == ARCHS and all(r.engine_bytes > 100_000 for r in results)
    manifest = json.loads((artifact / "manifest.json").read_text())
    weights = {"trt": "fp16", "trt-int8": "int8", "trt-fp8": "fp8", "trt-int4": "int4"}[recipe]
    assert manifest["precision"]["weights"].split()[0] == weights


def test_bfloat16_parses_and_aot_builds() -> None:
    import onnx_ir as ir

    artifact = built("trt", "llama", "standard", dtype="bfloat16")
    model = ir.load(artifact / "model.onnx")
    assert all(n.inputs[0].dtype == ir.DataType.BFLOAT16 for n in model.graph if n.op_type == "Attention")
    assert json.loads((artifact / "manifest.json").read_text())["kv_cache"]["dtype"] == "bfloat16"
    assert [r.arch for r in aot_check(artifact, ARCHS)] == ARCHS


def test_cli_build_with_aot_check(tmp_path) -> None:
    source = make_tiny_model("llama", tmp_path / "hf")
    out = tmp_path / "art"
    calib = tmp_path / "calib.txt"  # the tiny word-level tokenizer knows only w4 … w95
    calib.write_text(" ".join(f"w{4 + (i * 7) % 92}" for i in range(600)))
    result = CliRunner().invoke(main, ["build", str(source), "-o", str(out), "--target", "trt", "--fp8", "--verify",
                                       "--calib-text", str(calib), "--calib-tokens", "512",
                                       "--trt-max-batch", "4", "--trt-max-prefill", "64",
                                       "--aot-check", "sm89,sm120"])
    assert result.exit_code == 0, result.output
    assert "precision: weights fp8" in result.output and "(lossy)" in result.output  # --verify ran every pass
    assert "aot sm89: TensorRT-RTX parsed" in result.output and "aot sm120" in result.output
    assert f"graphopt engine {out}" in result.output  # no TensorRT + GPU here: says how to finish
    profiles = json.loads((out / "manifest.json").read_text())["optimization_profiles"]
    assert profiles[0]["shapes"]["input_ids"]["max"] == [4, 64] and profiles[1]["dims"]["batch"] == [1, 4, 4]
