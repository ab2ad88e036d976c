"""Quantization passes on a tiny traced Llama with a tied embedding: Q/DQ structure, exact lowering, numerics.

One model is traced per module (hidden 128, so the tied lm_head keeps its Transpose of the embedding
as in SmolLM2); each test runs passes on a fresh copy of its canonical graph.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from graphopt import sources
from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import find_embedding, find_linears, fold_input_scale
from graphopt.passes.base import PassContext, PipelineResults
from graphopt.passes.pipeline import load_recipe, parse_recipe, run_pipeline
from graphopt.quant.numerics import quantize_int
from graphopt.build.trace import trace
from graphopt.passes.verify import run_stage
from tiny_models import VOCAB, make_tiny_model

IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 6))
CONTEXT = PassContext(calibration_tokens=np.random.default_rng(1).integers(3, VOCAB, size=1024))


@pytest.fixture(scope="module")
def canonical(tmp_path_factory) -> tuple[bytes, np.ndarray]:
    hf = make_tiny_model("llama", tmp_path_factory.mktemp("q") / "hf", tie_word_embeddings=True,
                         hidden_size=128, intermediate_size=256)
    model = trace(sources.load_causal_lm(sources.resolve_source(str(hf))))
    run_pipeline(model, load_recipe("canonical"))
    return ir.to_proto(model).SerializeToString(), run_stage(model, IDS)


def _run(canonical, *passes: dict, verify: bool = False, results: PipelineResults | None = None):
    import onnx

    model = ir.from_proto(onnx.load_from_string(canonical[0]))
    records = run_pipeline(model, parse_recipe({"pass": list(passes)}), context=CONTEXT, verify=verify,
                           results=results)
    return model, records


def _ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_int4_puts_blocked_dq_on_every_weight_and_the_tied_embedding(canonical) -> None:
    results = PipelineResults()
    model, records = _run(canonical, {"name": "quantize-int4", "method": "rtn"}, results=results)
    assert records[0].modified and records[0].stats == {"matmuls": 14, "embedding": 1, "tied_lm_head": 1}
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1].producer().op_type == "DequantizeLinear":
            dq = node.inputs[1].producer()
            assert dq.inputs[0].dtype == ir.DataType.INT4 and dq.attributes["block_size"].value == 32
            assert dq.attributes["axis"].value == 0 and len(dq.inputs) == 2  # zero-point 0: none given
    gather = next(n for n in model.graph if n.op_type == "Gather")
    table_dq = gather.inputs[0].producer()
    assert table_dq.op_type == "DequantizeLinear" and table_dq.attributes["axis"].value == 1
    lm_head = model.graph.outputs[0].producer()
    assert lm_head.inputs[1].producer().op_type == "Transpose"
    assert lm_head.inputs[1].producer().inputs[0] is table_dq.outputs[0]  # one int4 table, two readers
    matrices = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT and len(v.shape) == 2]
    assert all(u.node.op_type == "DequantizeLinear" and u.idx == 1 for v in matrices for u in v.uses())  # scales only
    assert 0 < _rel(run_stage(model, IDS), canonical[1]) < 0.3
    assert results.precision["weights"] == "int4 block 32 symmetric (rtn)"


def test_int4_dequantized_weights_equal_the_math_module(canonical) -> None:
    model, _ = _run(canonical, {"name": "quantize-int4", "method": "rtn"})
    original, _ = _run(canonical, {"name": "cleanup"})
    weight = find_linears(original.graph)[0]
    dq = next(n for n in model.graph if n.name == f"{weight.weight.name}_DequantizeLinear")
    expected = quantize_int(weight.array, 4, axis=0, block_size=32)
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy().astype(np.int8), expected.q)
    np.testing.assert_array_equal(dq.inputs[1].const_value.numpy(), expected.scale)


def test_awq_scale_folding_is_exact_in_fp32(canonical) -> None:
    model, _ = _run(canonical, {"name": "cleanup"})
    groups: dict[str, list] = {}
    for lin in find_linears(model.graph):
        groups.setdefault(lin.node.inputs[0].name, []).append(lin)
    how = []
    for group in groups.values():
        s = np.random.default_rng(2).uniform(0.25, 4.0, size=group[0].array.shape[0]).astype(np.float32)
        how.append(fold_input_scale(model.graph, group[0].node.inputs[0], group, s))
    assert how.count("norm") == 4 and how.count("mul-matmul") == 2 and how.count(None) == 2  # o_proj: no fold
    assert _rel(run_stage(model, IDS), canonical[1]) < 1e-5


def test_awq_scales_and_clips_and_needs_calibration(canonical) -> None:
    model, records = _run(canonical, {"name": "calibrate"}, {"name": "quantize-int4", "method": "awq"})
    stats = records[1].stats
    assert stats["awq_clipped"] == 14 and stats["awq_unscaled_inputs"] == 2  # attention output → o_proj
    searched = [stats.get(k, 0) for k in ("awq_scaled_into_norm", "awq_scaled_into_mul_matmul", "awq_kept_unit_scale")]
    assert sum(searched) == 6 and sum(searched[:2]) >= 1  # q/k/v, gate/up and down of both layers
    assert records[0].stats["tokens"] == 1024 and not records[0].modified
    with pytest.raises(PassError, match="put a 'calibrate' pass before it"):
        _run(canonical, {"name": "quantize-int4"})


def test_int4_block_that_does_not_divide(canonical) -> None:
    with pytest.raises(PassError, match="block size 256 does not divide the input dimension 128.*--int4-block 32"):
        _run(canonical, {"name": "quantize-int4", "method": "rtn", "block_size": 256})


def test_int4_full_range_rounds_as_onnxruntime_and_lowers_exactly(canonical) -> None:
    """full_range: each block's peak maps to -8 (negative scales where the peak is positive); MatMulNBits and
    GatherBlockQuantized take those scales as they are, so lowering stays exact."""
    rtn = {"name": "quantize-int4", "method": "rtn", "full_range": True}
    results = PipelineResults()
    qdq, _ = _run(canonical, rtn, {"name": "lower-ort-cpu"}, results=results)
    assert results.precision["weights"] == "int4 block 32 symmetric full-range (rtn)"
    original, _ = _run(canonical, {"name": "cleanup"})
    weight = find_linears(original.graph)[0]
    dq = next(n for n in qdq.graph if n.name == f"{weight.weight.name}_DequantizeLinear")
    expected = quantize_int(weight.array, 4, axis=0, block_size=32, full_range=True)
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy(), expected.q)
    assert (dq.inputs[1].const_value.numpy() < 0).any()
    plain, _ = _run(canonical, {"name": "quantize-int4", "method": "rtn"}, {"name": "lower-ort-cpu"})
    assert _rel(run_stage(qdq, IDS), canonical[1]) < _rel(run_stage(plain, IDS), canonical[1])
    lowered, _ = _run(canonical, rtn, {"name": "lower-ort-cpu"}, {"name": "lower-quant-ort-cpu", "accuracy_level": 0},
                      {"name": "cleanup"})
    assert "DequantizeLinear" not in _ops(lowered) and _ops(lowered)["GatherBlockQuantized"] == 1
    assert float(np.abs(run_stage(lowered, IDS) - run_stage(qdq, IDS)).max()) < 1e-4


def test_int4_lowering_is_exact_and_shares_the_embedding_bytes(canonical) -> None:
    qdq, _ = _run(canonical, {"name": "quantize-int4", "method": "rtn"}, {"name": "lower-ort-cpu"})
    lowered, records = _run(canonical, {"name": "quantize-int4", "method": "rtn"}, {"name": "lower-ort-cpu"},
                            {"name": "lower-quant-ort-cpu", "accuracy_level": 0})
    assert records[2].stats == {"matmul_nbits": 14, "lm_head": 1, "gather_block_quantized": 1}
    lm_head = lowered.graph.outputs[0].producer()
    assert lm_head.attributes["N"].value == VOCAB and lm_head.attributes["accuracy_level"].value == 0
    gather = next(n for n in lowered.graph if n.op_type == "GatherBlockQuantized")
    assert gather.inputs[0].producer().inputs[0] is lm_head.inputs[1]  # a Reshape of the lm_head's B: one copy
    run_pipeline(lowered, parse_recipe({"pass": [{"name": "cleanup"}]}))
    ops = _ops(lowered)
    assert ops["MatMulNBits"] == 15 and ops["GatherBlockQuantized"] == 1
    assert "DequantizeLinear" not in ops and "MatMul" not in ops and "Transpose" not in ops
    assert float(np.abs(run_stage(lowered, IDS) - run_stage(qdq, IDS)).max()) < 1e-4


def test_int8_dynamic_and_its_lowering(canonical) -> None:
    qdq, records = _run(canonical, {"name": "quantize-int8"}, {"name": "lower-ort-cpu"})
    assert _ops(qdq)["DynamicQuantizeLinear"] == 8 and records[0].stats["matmuls"] == 14  # one per shared input
    lowered, records = _run(canonical, {"name": "quantize-int8"}, {"name": "lower-ort-cpu"},
                            {"name": "lower-quant-ort-cpu", "accuracy_level": 0}, {"name": "cleanup"})
    ops = _ops(lowered)
    assert ops["DynamicQuantizeMatMul"] == 14 and ops["MatMulNBits"] == 1 and ops["GatherBlockQuantized"] == 1
    assert next(n for n in lowered.graph if n.op_type == "MatMulNBits").attributes["bits"].value == 8
    assert float(np.abs(run_stage(lowered, IDS) - run_stage(qdq, IDS)).max()) < 1e-4
    assert _rel(run_stage(lowered, IDS), canonical[1]) < 0.05


def test_int8_static_with_smoothquant(canonical) -> None:
    passes = [{"name": "calibrate"}, {"name": "quantize-int8", "activations": "static", "smoothquant_alpha": 0.5},
              {"name": "lower-ort-cpu"}]
    qdq, records = _run(canonical, *passes)
    assert records[1].stats["smoothquant_inputs"] == 6 and records[1].stats["static_activation_quantizers"] == 8
    quant = [n for n in qdq.graph if n.op_type == "QuantizeLinear"]
    assert len(quant) == 8 and all(n.attributes["output_dtype"].value == ir.DataType.INT8 for n in quant)
    lowered, _ = _run(canonical, *passes, {"name": "lower-quant-ort-cpu", "accuracy_level": 0}, {"name": "cleanup"})
    assert _ops(lowered)["MatMulIntegerToFloat"] == 14
    assert float(np.abs(run_stage(lowered, IDS) - run_stage(qdq, IDS)).max()) < 1e-4
    assert _rel(run_stage(lowered, IDS), canonical[1]) < 0.05


def test_fp8_qdq_is_kept_and_marked_simulated(canonical) -> None:
    results = PipelineResults()
    model, records = _run(canonical, {"name": "calibrate"}, {"name": "quantize-fp8"}, {"name": "lower-ort-cpu"},
                          {"name": "lower-quant-ort-cpu"}, results=results)
    weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    assert len(weights) == 15 and all(n.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN for n in weights)
    assert records[1].stats["activation_quantizers"] == 9  # 8 shared inputs + the lm_head's
    assert not records[3].modified and records[3].stats == {"fp8_qdq_simulated": 9}
    assert "fidelity simulation" in results.precision["note"]
    assert _rel(run_stage(model, IDS), canonical[1]) < 0.1


@pytest.mark.parametrize("dtype", ["fp8", "int8"])
def test_kv_cache_qdq_per_layer(canonical, dtype: str) -> None:
    model, records = _run(canonical, {"name": "calibrate"}, {"name": "quantize-kv-cache", "dtype": dtype},
                          {"name": "lower-ort-cpu"})
    assert records[1].stats == {"layers": 2}
    for gqa in (n for n in model.graph if n.op_type == "GroupQueryAttention"):
        for index in (1, 2):
            assert gqa.inputs[index].producer().op_type == "DequantizeLinear"
    assert 0 < _rel(run_stage(model, IDS), canonical[1]) < 0.05


def test_passes_without_targets_change_nothing() -> None:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 3]))
    node = ir.node("MatMul", [x, y])
    node.outputs[0].name = "logits"
    model = ir.Model(ir.Graph([x, y], node.outputs, nodes=[node], opset_imports={"": 23}), ir_version=10)
    assert find_linears(model.graph) == [] and find_embedding(model.graph) is None
    records = run_pipeline(model, parse_recipe({"pass": [
        {"name": "quantize-int4", "method": "rtn"}, {"name": "quantize-int8"}, {"name": "lower-quant-ort-cpu"}]}))
    assert [r.modified for r in records] == [False, False, False]


def test_verify_records_lossy_passes_instead_of_failing(canonical) -> None:
    _, records = _run(canonical, {"name": "quantize-int4", "method": "rtn"}, {"name": "lower-ort-cpu"},
                      {"name": "lower-quant-ort-cpu", "accuracy_level": 0}, {"name": "cleanup"}, verify=True)
    by_name = {r.name: r for r in records}
    assert by_name["quantize-int4"].lossy and by_name["quantize-int4"].max_abs_diff > 1e-3
    assert not by_name["lower-ort-cpu"].lossy and by_name["lower-ort-cpu"].max_abs_diff < 1e-4
    assert not by_name["lower-quant-ort-cpu"].lossy  # accuracy_level 0 is exact: still held to 1e-4
