"""The cost model on small hand-built graphs whose figures are worked out by hand below (the tiny-model
artifact, with its attention and quantized ops, is checked against the config's dimensions in test_compare)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.evaluate.cost_model import cost_model
from graphopt.evaluate.gate import COST_KEYS, CompareError

V, H = 32, 8  # vocabulary, hidden


def save(tmp_path: Path, nodes, initializers, inputs, outputs) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def tied_model(tmp_path: Path, dim: str = "batch") -> Path:
    """ids → Gather(emb) → x; y = x @ W; z = y + x; logits = z @ embᵀ (Transpose of emb: a constant)."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.normal(size=(V, H)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.normal(size=(H, H)).astype(np.float32), "w")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Add", ["y", "x"], ["z"]),
             helper.make_node("Transpose", ["emb"], ["emb_t"]),
             helper.make_node("MatMul", ["z", "emb_t"], ["logits"])]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [dim, "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dim, "seq", V])
    return save(tmp_path, nodes, [emb, w], [ids], [logits])


def test_figures_of_a_tied_model_by_hand(tmp_path: Path) -> None:
    cost = cost_model(tied_model(tmp_path), prompt_tokens=4, context=6)
    # decode: the Gather reads one row of emb; W and embᵀ whole (the Transpose is folded at load, costs nothing)
    assert cost["decode_weight_bytes"] == 4 * (H + H * H + V * H)
    assert cost["by_op"]["Gather"]["decode_weight_bytes"] == 4 * H
    assert cost["by_op"]["MatMul"]["decode_weight_bytes"] == 4 * (H * H + V * H)
    assert "Transpose" not in cost["by_op"] and cost["decode_kv_bytes"] == 0
    # FLOPs per token: two MatMuls (2·K·N each) and one Add per element; the same at any sequence length here
    per_token = 2 * H * H + 2 * H * V + H
    assert cost["decode_flops_per_token"] == cost["prefill_flops_per_token"] == per_token
    # peak: after the Add x, y and z are alive (3·S·H floats); then z and logits (S·H + S·V)
    for key, seq in (("prefill_peak_activation_bytes", 4), ("decode_peak_activation_bytes", 1)):
        assert cost[key] == 4 * max(3 * seq * H, seq * H + seq * V)
    assert cost["at"] == {"batch": 1, "prompt_tokens": 4, "context": 6} and cost["uncounted_ops"] == []
    assert set(COST_KEYS) <= set(cost)


def test_int4_weights_count_half_a_byte_and_unknown_ops_are_listed(tmp_path: Path) -> None:
    packed = helper.make_tensor("q", TensorProto.INT4, [H, 3], np.zeros(H * 3, dtype=np.int8).tolist())
    scale = numpy_helper.from_array(np.ones(3, dtype=np.float32), "scale")
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["w"], axis=1),  # not folded: ORT keeps DQ
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Mod", ["y", "y"], ["out"], fmod=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", 3])
    cost = cost_model(save(tmp_path, nodes, [packed, scale], [x], [out]), 2, 2)
    assert cost["decode_weight_bytes"] == cost["by_op"]["DequantizeLinear"]["decode_weight_bytes"] == H * 3 // 2 + 4 * 3
    assert cost["decode_flops_per_token"] == 2 * H * 3  # the MatMul; DequantizeLinear moves data, Mod is not counted
    assert cost["uncounted_ops"] == ["Mod"]


def test_unknown_dimension_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="dimension 'tokens'"):
        cost_model(tied_model(tmp_path, dim="tokens"), 4, 6)
    with pytest.raises(CompareError, match="1 ≤ P ≤ T"):
        cost_model(tied_model(tmp_path), 8, 6)
