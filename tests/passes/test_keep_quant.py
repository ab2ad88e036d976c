"""keep-quant on hand-built graphs, one GGUF block type at a time: the Q/DQ graph reproduces the fp32 graph of
the GGUF's dequantized weights (ORT, fp32), and so does its MatMulNBits lowering at accuracy_level 1 (int8
blocks split into two exact 4-bit halves).

    x [2,3,K] ─MatMul(W1 [K,N])─► h ─MatMul(W2 [N,K])─► y         W1, W2 = gguf-py's dequantized blocks
    K-quants need K a multiple of 256; the others run at K = 64.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import gguf
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from graphopt.core.errors import PassError
from graphopt.passes.base import PassContext
from graphopt.passes.pipeline import parse_recipe, run_pipeline
from graphopt.quant import hf_packing
from graphopt.quant.gguf_blocks import EXACT_TYPES, decode
from graphopt.sources.gguf_weights import QuantizedWeights, fingerprint

WITH_OFFSET = ("Q4_1", "Q5_1", "Q4_K", "Q5_K")


def _gguf_tensor(kind: str, rows: int, cols: int, seed: int):
    """(fp32 values [rows, cols], BlockQuant): random weights quantized by gguf-py where it can, else random
    blocks (K-quants: gguf-py only reads them)."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[kind]
    if kind.endswith("_K"):
        per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows * cols // per_block, nbytes), dtype=np.uint8)
        start = 208 if kind == "Q6_K" else 0
        for field in (start, start + 2) if kind != "Q6_K" else (start,):
            raw[:, field:field + 2] = rng.normal(0, 1e-3, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32), qtype)
    return gguf.quants.dequantize(raw, qtype).reshape(rows, cols), decode(kind, raw, cols)


def _graph(w1: np.ndarray, w2: np.ndarray) -> ir.Model:
    k = w1.shape[0]
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3, k]))
    inits = [ir.Value(name=n, const_value=ir.tensor(a, name=n)) for n, a in (("w1", w1), ("w2", w2))]
    for value in inits:
        value.dtype, value.shape = ir.DataType.FLOAT, ir.Shape(value.const_value.shape)
    first = ir.node("MatMul", [x, inits[0]], name="first")
    second = ir.node("MatMul", [first.outputs[0], inits[1]], name="second")
    second.outputs[0].name = "y"
    for value in (first.outputs[0], second.outputs[0]):
        value.dtype = ir.DataType.FLOAT
    graph = ir.Graph([x], second.outputs, nodes=[first, second], initializers=inits, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """Without ORT's graph optimizer, which would turn DQ+MatMul into MatMulNBits with int8 activations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", EXACT_TYPES)
def test_keep_quant_reproduces_the_dequantized_graph(kind: str) -> None:
    k, n = (256, 256) if kind.endswith("_K") else (64, 96)
    (v1, b1), (v2, b2) = _gguf_tensor(kind, n, k, 0), _gguf_tensor(kind, k, n, 1)  # GGUF rows = out channels
    weights = QuantizedWeights(Path("t.gguf"), {fingerprint(v1): ("a", b1), fingerprint(v2): ("b", b2)}, {kind: 2}, 0)
    context = PassContext(quantized_weights=weights)
    x = np.random.default_rng(2).normal(size=(2, 3, k)).astype(np.float32)
    reference = _run(_graph(v1.T.copy(), v2.T.copy()), x)
    model = _graph(v1.T.copy(), v2.T.copy())
    records = run_pipeline(model, parse_recipe({"pass": [{"name": "keep-quant"}]}), context=context)
    stats = records[0].stats
    assert records[0].modified and stats[f"matmuls_{kind.lower()}"] == 2
    assert stats.get("offset_corrections", 0) == (2 if kind in WITH_OFFSET else 0)
    assert not any(v.dtype == ir.DataType.FLOAT and v.name in ("w1", "w2") for v in model.graph.initializers.values())
    scale = float(np.abs(reference).max())
    assert np.abs(_run(model, x) - reference).max() <= 1e-5 * scale
    lowering = {"name": "lower-quant-ort-cpu", "accuracy_level": 1, "split_int8": True}
    run_pipeline(model, parse_recipe({"pass": [lowering, {"name": "cleanup"}]}))
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops["MatMulNBits"] == sum(1 if b.bits == 4 else 2 for b in (b1, b2))  # int8: two halves
    assert ops["DequantizeLinear"] == 0
    assert np.abs(_run(model, x) - reference).max() <= 1e-5 * scale


def test_shared_input_sums_once() -> None:
    """Two projections of one input (q/k/v, gate/up) share one block-sum MatMul."""
    (v1, b1), (v2, b2) = _gguf_tensor("Q4_1", 32, 64, 0), _gguf_tensor("Q4_1", 32, 64, 1)
    model = _two_projections(v1, v2)
    weights = QuantizedWeights(Path("t.gguf"), {fingerprint(v1): ("a", b1), fingerprint(v2): ("b", b2)}, {}, 0)
    records = run_pipeline(model, parse_recipe({"pass": [{"name": "keep-quant"}]}),
                           context=PassContext(quantized_weights=weights))
    assert records[0].stats["offset_corrections"] == 2
    assert sum(node.name.endswith("_block_sums") for node in model.graph) == 1


def _act_order_layer(k: int, n: int, order: np.ndarray, seed: int):
    """(fp32 [n, k] weight, BlockQuant) of a random asymmetric 4-bit GPTQ act-order layer, groups of 16."""
    rng = np.random.default_rng(seed)
    groups = np.empty(k, np.int64)
    groups[order] = np.arange(k) // 16
    q, zero = rng.integers(0, 16, (k, n)), rng.integers(0, 16, (k // 16, n))
    scale = rng.uniform(1e-3, 1e-2, (k // 16, n)).astype(np.float16).astype(np.float32)
    weight = hf_packing.reference_weight(q, zero, scale, groups).T.copy()
    return weight, hf_packing.to_blocks(q, zero, scale, groups, 4, "GPTQ_INT4")


def test_act_order_reads_the_input_in_group_order_once() -> None:
    """Two GPTQ act-order projections of one input (one Hessian, one order) share one Gather and one block sum."""
    order = np.random.default_rng(0).permutation(64)
    (v1, b1), (v2, b2) = _act_order_layer(64, 32, order, 1), _act_order_layer(64, 32, order, 2)
    assert b1.input_order is not None and b1.offset is not None
    model = _two_projections(v1, v2)
    x = np.random.default_rng(3).normal(size=(2, 3, 64)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    reference = before.run(None, {"x": x})
    weights = QuantizedWeights(Path("hf"), {fingerprint(v1): ("a", b1), fingerprint(v2): ("b", b2)}, {}, 0, "gptq")
    passes = [{"name": "keep-quant"}, {"name": "lower-quant-ort-cpu", "accuracy_level": 1}, {"name": "cleanup"}]
    records = run_pipeline(model, parse_recipe({"pass": passes}), context=PassContext(quantized_weights=weights))
    assert records[0].stats["reordered_inputs"] == 1 and records[0].stats["offset_corrections"] == 2
    ops = collections.Counter(node.op_type for node in model.graph)
    assert ops["Gather"] == 1 and ops["MatMulNBits"] == 2
    assert sum(node.name.endswith("_block_sums") for node in model.graph) == 1
    after = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    for got, want in zip(after.run(None, {"x": x}), reference):
        assert np.abs(got - want).max() <= 1e-5 * float(np.abs(want).max())


def test_unmatched_gguf_tensor_is_an_error() -> None:
    (v1, b1) = _gguf_tensor("Q8_0", 32, 64, 0)
    stranger = dataclasses.replace(b1, gguf_type="Q8_0")
    weights = QuantizedWeights(Path("t.gguf"), {"0" * 40: ("blk.0.ffn_up.weight", stranger)}, {"Q8_0": 1}, 0)
    with pytest.raises(PassError, match="blk.0.ffn_up.weight.*Q8_0.*matches no weight"):
        run_pipeline(_graph(v1.T.copy(), np.eye(32, dtype=np.float32)), parse_recipe({"pass": [{"name": "keep-quant"}]}),
                     context=PassContext(quantized_weights=weights))


def test_needs_quantized_weights() -> None:
    with pytest.raises(PassError, match="--keep-quant"):
        run_pipeline(_graph(np.eye(32, dtype=np.float32), np.eye(32, dtype=np.float32)),
                     parse_recipe({"pass": [{"name": "keep-quant"}]}), context=PassContext())


def test_trt_form_flips_negative_scales() -> None:
    """Q4_0 keeps llama.cpp's signed d (d = max / -8): for TensorRT (scales > 0) lower-trt negates those
    blocks, widening int4 to int8 where -8 would become 8; the values stay the same."""
    from graphopt.passes.lower_trt import LowerTrtPass

    (v1, b1), (v2, b2) = _gguf_tensor("Q4_0", 96, 64, 0), _gguf_tensor("Q4_0", 64, 96, 1)
    assert (b1.scale < 0).any() and b1.bits == 4
    weights = QuantizedWeights(Path("t.gguf"), {fingerprint(v1): ("a", b1), fingerprint(v2): ("b", b2)}, {}, 0)
    model = _graph(v1.T.copy(), v2.T.copy())
    run_pipeline(model, parse_recipe({"pass": [{"name": "keep-quant"}]}), context=PassContext(quantized_weights=weights))
    x = np.random.default_rng(2).normal(size=(2, 3, 64)).astype(np.float32)
    before = _run(model, x)
    lowering = LowerTrtPass()
    lowering._flip_negative_scales(model.graph)
    dqs = [node for node in model.graph if node.op_type == "DequantizeLinear"]
    assert all((node.inputs[1].const_value.numpy() >= 0).all() for node in dqs)
    assert lowering.stats["negative_scales_flipped"] == 2 and lowering.stats["int4_widened_to_int8"] == 2
    assert np.array_equal(_run(model, x), before)


def _two_projections(v1: np.ndarray, v2: np.ndarray) -> ir.Model:
    """The test graph with weight ``v1`` plus a third MatMul of the same input by ``v2`` (output "z")."""
    model = _graph(v1.T.copy(), np.eye(32, dtype=np.float32))
    extra = ir.node("MatMul", [model.graph.inputs[0], ir.Value(name="w3", const_value=ir.tensor(v2.T.copy()))],
                    name="third")
    extra.inputs[1].dtype, extra.inputs[1].shape = ir.DataType.FLOAT, ir.Shape([64, 32])
    model.graph.register_initializer(extra.inputs[1])
    model.graph.append(extra)
    model.graph.outputs.append(extra.outputs[0])
    extra.outputs[0].name, extra.outputs[0].dtype = "z", ir.DataType.FLOAT
    return model
