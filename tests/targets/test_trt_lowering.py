"""--target trt: the lowered graph of tiny random models matches the canonical graph on ONNX Runtime (fp16
budget: max |Δlogits| ≤ 2e-2) over a ragged batched prefill and decode steps, and has TensorRT's form."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from trt_helpers import built, run_steps, session

TOLERANCE = 2e-2
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
DECODE = [[20, 21], [22, 23], [24, 25]]
CASES = [("llama", {}), ("gpt2", {}), ("mistral", {"sliding_window": 4})]


def _worst(arch: str, overrides: dict, attention: str = "standard") -> float:
    trt = built("trt", arch, attention, **overrides)
    canonical = built("canonical", arch, **overrides)
    capacity = json.loads((trt / "manifest.json").read_text())["trt"]["cache_capacity"]
    expected = run_steps(session(canonical), PROMPTS, DECODE, capacity)
    got = run_steps(session(trt), PROMPTS, DECODE, capacity)
    worst = 0.0
    for e, g in zip(expected, got):
        for row, prompt in enumerate(PROMPTS):
            valid = len(prompt) if e.shape[1] > 1 else 1  # padded prefill positions are not compared
            worst = max(worst, float(np.abs(e[row, :valid] - g[row, :valid]).max()))
    return worst


@pytest.mark.parametrize("arch,overrides", CASES, ids=[c[0] for c in CASES])
def test_trt_graph_matches_canonical(arch: str, overrides: dict) -> None:
    worst = _worst(arch, overrides)
    assert worst <= TOLERANCE, f"{arch}: max |logits(trt fp16) - logits(canonical fp32)| = {worst:.3g}"


def test_plugin_graph_matches_canonical() -> None:
    worst = _worst("llama", {}, attention="plugin")
    assert worst <= TOLERANCE, f"plugin: max |Δlogits| = {worst:.3g}"


def test_trt_graph_form_and_manifest() -> None:
    artifact = built("trt")
    model = ir.load(artifact / "model.onnx")
    ops = [n.op_type for n in model.graph]
    assert ops.count("TensorScatter") == 4 and ops.count("Attention") == 2 and "FlashAttention" not in ops
    assert model.opset_imports[""] == 24 and set(model.opset_imports) == {""}
    attention = [n for n in model.graph if n.op_type == "Attention"]
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT16 and n.inputs[3].dtype == ir.DataType.BOOL for n in attention)
    assert not any(v.dtype == ir.DataType.FLOAT for v in model.graph.initializers.values()
                   if v.uses() and v.uses()[0].node.op_type != "Mul")  # only RoPE's inv_freq stays fp32
    io = {v.name: v for v in [*model.graph.inputs, *model.graph.outputs]}
    assert io["logits"].dtype == ir.DataType.FLOAT and io["past_key.0"].dtype == ir.DataType.FLOAT16
    assert io["present_value.1"].shape[2] == 256 and io["cache_lens"].dtype == ir.DataType.INT32
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"] == "trt" and manifest["kv_cache"]["dtype"] == "float16"
    assert manifest["precision"]["compute"] == "fp16" and manifest["trt"]["cache_capacity"] == 256
    assert [p["name"] for p in manifest["optimization_profiles"]] == ["prefill", "decode"]
    assert manifest["optimization_profiles"][0]["shapes"]["input_ids"]["max"] == [8, 512]
    assert manifest["plugins"] == [] and manifest["min_runtime"]["tensorrt"]
    report = json.loads((artifact / "build-report.json").read_text())
    check = next(p for p in report["passes"] if p["name"] == "check-trt")
    assert check["stats"]["nodes_checked"] == len(ops)


def test_plugin_node_and_function() -> None:
    artifact = built("trt", attention="plugin")
    model = ir.load(artifact / "model.onnx")
    nodes = [n for n in model.graph if n.op_type == "FlashAttention"]
    assert len(nodes) == 2 and all(n.domain == "graphopt" for n in nodes)
    assert all(n.attributes["plugin_namespace"].value == "graphopt" and n.attributes["plugin_version"].value == "1"
               for n in nodes)
    (function,) = model.functions.values()
    body = [n.op_type for n in function]
    assert body.count("TensorScatter") == 2 and body.count("Attention") == 1
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["plugins"][0] | {"nodes": 2} == manifest["plugins"][0]
    assert (manifest["plugins"][0]["namespace"], manifest["plugins"][0]["version"]) == ("graphopt", "1")


def test_plugin_mode_keeps_windowed_attention_standard() -> None:
    artifact = built("trt", "mistral", "plugin", sliding_window=4)
    model = ir.load(artifact / "model.onnx")
    assert not any(n.op_type == "FlashAttention" for n in model.graph) and not model.functions
    report = json.loads((artifact / "build-report.json").read_text())
    assert any("sliding window 4" in note for note in report["unfused"])
    assert json.loads((artifact / "manifest.json").read_text())["plugins"] == []
