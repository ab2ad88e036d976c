"""Passes on small hand-built graphs: positive and negative cases, numerics on ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.core.errors import PassError, RecipeError
from graphopt.passes import REGISTRY
from graphopt.passes.fuse_attention import FuseAttentionPass
from graphopt.passes.keep_logits import KeepLogitsPass
from graphopt.passes.lower_ort_cpu import LowerOrtCpuPass
from graphopt.passes.pipeline import load_recipe, parse_recipe, run_pipeline
from graphopt.passes.verify import run_stage

B, S, H, D, V = "batch", "seq", 2, 4, 16


def _value(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _attention_model(mask: str) -> ir.Model:
    """Embedding → q/k/v (4-D) → Attention-23 (mask: 'causal-attr', 'none', 'full-bool') → lm_head."""
    rng = np.random.default_rng(0)
    ids = _value("input_ids", ir.DataType.INT64, [B, S])
    pos = _value("position_ids", ir.DataType.INT64, [B, S])
    tape = ir.tape.Tape()
    const = lambda a, n: tape.initializer(ir.tensor(a.astype(np.float32), name=n))  # noqa: E731
    emb = tape.op("Gather", [const(rng.normal(size=(V, H * D)), "emb"), ids])
    emb.shape, emb.dtype = ir.Shape([B, S, H * D]), ir.DataType.FLOAT
    heads = []
    for name in "qkv":
        x3 = tape.op("MatMul", [emb, const(rng.normal(size=(H * D, H * D)), f"w{name}")])
        x3.shape, x3.dtype = ir.Shape([B, S, H * D]), ir.DataType.FLOAT
        shape = tape.initializer(ir.tensor(np.array([0, 0, H, D], np.int64), name=f"s{name}"))
        x4 = tape.op("Transpose", [tape.op("Reshape", [x3, shape])], attributes={"perm": [0, 2, 1, 3]})
        x4.shape, x4.dtype = ir.Shape([B, H, S, D]), ir.DataType.FLOAT
        heads.append(x4)
    inputs, attrs = list(heads), {"scale": 0.5}
    if mask == "causal-attr":
        attrs["is_causal"] = 1
    elif mask == "full-bool":  # all True: bidirectional, must not be fused as causal
        ones = tape.op("ConstantOfShape", [tape.op("Shape", [ids])],
                       attributes={"value": ir.tensor(np.array([True]))})
        inputs.append(tape.op("Unsqueeze", [tape.op("Unsqueeze", [ones, tape.initializer(
            ir.tensor(np.array([1], np.int64), name="ax1"))]), tape.initializer(ir.tensor(np.array([3], np.int64), name="ax3"))]))
    out4 = tape.op("Attention", inputs, attributes=attrs)
    out4.shape, out4.dtype = ir.Shape([B, H, S, D]), ir.DataType.FLOAT
    merged = tape.op("Reshape", [tape.op("Transpose", [out4], attributes={"perm": [0, 2, 1, 3]}),
                                 tape.initializer(ir.tensor(np.array([0, 0, -1], np.int64), name="s3"))])
    merged.shape, merged.dtype = ir.Shape([B, S, H * D]), ir.DataType.FLOAT
    logits = tape.op("MatMul", [merged, const(rng.normal(size=(H * D, V)), "lm")])
    logits.name, logits.shape, logits.dtype = "logits", ir.Shape([B, S, V]), ir.DataType.FLOAT
    graph = ir.Graph([ids, pos], [logits], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 23}, name="tiny")
    return ir.Model(graph, ir_version=10)


def test_fuse_attention_positive_keeps_numerics() -> None:
    model = _attention_model("causal-attr")
    ids = np.random.default_rng(1).integers(0, V, size=(2, 5))
    before = run_stage(model, ids)
    fuse = FuseAttentionPass()
    assert fuse(model).modified
    assert fuse.stats == {"fused_attention_op": 1}
    assert [n.op_type for n in model.graph].count("FlashAttention") == 1
    assert "Transpose" not in [n.op_type for n in model.graph]  # BSHD in and out: no layout changes left
    np.testing.assert_allclose(run_stage(model, ids), before, atol=1e-5)


@pytest.mark.parametrize("mask", ["none", "full-bool"])
def test_fuse_attention_refuses_bidirectional(mask: str) -> None:
    model = _attention_model(mask)
    fuse = FuseAttentionPass()
    assert not fuse(model).modified
    assert fuse.stats == {"unfused": 1} and "not fused" in fuse.notes[0]


def test_insert_kv_cache_requires_fusion() -> None:
    model = _attention_model("causal-attr")
    with pytest.raises(PassError, match="fuse-attention"):
        run_pipeline(model, parse_recipe({"pass": [{"name": "insert-kv-cache"}]}))


def test_canonical_recipe_contract_numerics() -> None:
    model = _attention_model("causal-attr")
    ids = np.random.default_rng(2).integers(0, V, size=(2, 6))
    before = run_stage(model, ids)
    records = run_pipeline(model, load_recipe("canonical"), verify=True)
    names = {v.name for v in model.graph.inputs}
    assert {"cache_lens", "input_lens", "logit_positions", "past_key.0", "past_value.0"} <= names
    assert {v.name for v in model.graph.outputs} == {"logits", "present_key.0", "present_value.0"}
    assert all(r.max_abs_diff is not None and r.max_abs_diff <= 1e-4 for r in records)
    np.testing.assert_allclose(run_stage(model, ids), before, atol=1e-5)


def test_keep_logits_needs_a_matmul_lm_head() -> None:
    model = _attention_model("causal-attr")
    lm_head = model.graph.outputs[0].producer()
    relu = ir.node("Relu", [lm_head.inputs[0]])
    relu.outputs[0].shape, relu.outputs[0].dtype = lm_head.inputs[0].shape, ir.DataType.FLOAT
    model.graph.insert_before(lm_head, relu)
    lm_head.outputs[0].replace_all_uses_with(relu.outputs[0], replace_graph_outputs=True)
    model.graph.remove(lm_head, safe=True)
    relu.outputs[0].name = "logits"
    with pytest.raises(PassError, match="keep-logits"):
        KeepLogitsPass()(model)


def test_lower_ort_cpu_without_cache_is_an_error() -> None:
    model = _attention_model("causal-attr")
    FuseAttentionPass()(model)
    with pytest.raises(PassError, match="insert-kv-cache"):
        LowerOrtCpuPass()(model)


def test_lower_ort_cpu_leaves_a_plain_graph_alone() -> None:
    model = _attention_model("none")
    assert not LowerOrtCpuPass()(model).modified


@pytest.mark.parametrize("entry,message", [
    ({"name": "no-such-pass"}, "unknown pass"),
    ({"name": "cleanup", "bogus": 1}, "no option"),
    ({"name": "lower-ort-cpu", "rmsnorm": "yes"}, "should be bool"),
])
def test_recipe_errors(entry: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"pass": [entry]})


@pytest.mark.parametrize("budget,message", [
    ({"top1_min": 0.9}, "takes kl_max"),
    ({"kl_max": 0.01, "kl": 1}, "takes kl_max"),
    ({"kl_max": -1}, "should be a number > 0"),
    ({"kl_max": "0.01"}, "should be a number > 0"),
    ({"kl_max": 0.01, "top1_min": 97}, r"should be in \(0, 1\]"),
])
def test_recipe_budget_errors(budget: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"pass": [{"name": "cleanup"}], "budget": budget})


def test_recipe_budget() -> None:
    assert parse_recipe({"pass": [{"name": "cleanup"}]}).budget is None
    assert parse_recipe({"pass": [{"name": "cleanup"}], "budget": {"kl_max": 1}}).budget == (1.0, None)
    assert load_recipe("ort-cpu-keep-quant-fast").budget == (0.01, 0.95)


def test_registry_names_are_kebab_case() -> None:
    assert all(name == name.lower() and " " not in name and "_" not in name for name in REGISTRY)
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("nope")


def test_unfused_attention_stops_the_cache_pass_with_what_was_seen() -> None:
    from graphopt.passes.insert_kv_cache import InsertKVCachePass

    model = _attention_model("full-bool")  # bidirectional: no pass understands it as causal attention
    fuse = FuseAttentionPass()
    assert fuse(model).modified is False and fuse.stats == {"unfused": 1}
    with pytest.raises(PassError, match=r"is not fused: .*mask.*; without the cache"):
        run_pipeline(model, parse_recipe({"pass": [{"name": "insert-kv-cache"}]}))
