"""quantize-int4-ort (ONNX Runtime's MatMulNBitsQuantizer as graphopt's int4 peer) on a tiny traced Llama with a
tied embedding: every MatMul becomes MatMulNBits, the embedding GatherBlockQuantized, with ORT's own numbers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt import sources
from graphopt.build.trace import trace
from graphopt.core.errors import PassError
from graphopt.passes.base import PipelineResults
from graphopt.passes.pipeline import load_recipe, parse_recipe, run_pipeline
from graphopt.passes.quantize_int4_ort import ort_quantize
from graphopt.passes.verify import run_stage
from tiny_models import VOCAB, make_tiny_model

IDS = np.random.default_rng(0).integers(3, VOCAB, size=(2, 6))


@pytest.fixture(scope="module")
def lowered(tmp_path_factory) -> tuple[bytes, np.ndarray]:
    hf = make_tiny_model("llama", tmp_path_factory.mktemp("ortq") / "hf", tie_word_embeddings=True,
                         hidden_size=128, intermediate_size=256)
    model = trace(sources.load_causal_lm(sources.resolve_source(str(hf))))
    run_pipeline(model, load_recipe("canonical"))
    run_pipeline(model, parse_recipe({"pass": [{"name": "lower-ort-cpu", "rmsnorm": True}]}))
    return ir.to_proto(model).SerializeToString(), run_stage(model, IDS)


def _quantized(lowered, **options):
    model = ir.from_proto(onnx.load_from_string(lowered[0]))
    results = PipelineResults()
    records = run_pipeline(model, parse_recipe({"pass": [{"name": "quantize-int4-ort", **options}, {"name": "cleanup"}]}),
                           results=results)
    return model, records[0], results


def test_every_matmul_and_the_tied_embedding_become_ort_int4(lowered) -> None:
    model, record, results = _quantized(lowered)
    ops = Counter(n.op_type for n in model.graph)
    assert ops["MatMulNBits"] == 15 and ops["GatherBlockQuantized"] == 1  # 14 linears + the untied lm_head
    assert "MatMul" not in ops and "Transpose" not in ops and "Gather" not in ops
    assert record.stats == {"matmul_nbits": 15, "gather_block_quantized": 1} and record.lossy
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            assert node.attributes["accuracy_level"].value == 4 and node.attributes["block_size"].value == 32
            assert len(node.inputs) == 3  # symmetric: no zero points
    floats = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT and len(v.shape or ()) == 2
              and v.shape[0] * v.shape[1] >= 128 * 128]
    assert not floats  # no fp32 weight matrix left behind
    assert results.precision["weights"] == "int4 block 32 symmetric (ort-rtn)"
    got = run_stage(model, IDS)
    assert 0 < float(np.linalg.norm(got - lowered[1]) / np.linalg.norm(lowered[1])) < 0.3


def test_numbers_are_ort_s_symmetric_rtn() -> None:
    """The block's largest-magnitude weight maps to -8 exactly (scale = it / -8); the rest round to nearest."""
    w = np.random.default_rng(2).standard_normal((64, 8)).astype(np.float32)
    (op, attributes, tensors), = ort_quantize([("MatMul", w)], 32, 4)
    packed, scales = tensors[0].numpy(), tensors[1].numpy().reshape(8, 2)
    assert op == "MatMulNBits" and attributes["K"] == 64 and attributes["N"] == 8
    q = np.stack([packed & 15, packed >> 4], -1).reshape(8, 2, 32).astype(np.int16) - 8  # [N, K/b, b]
    blocks = w.T.reshape(8, 2, 32)
    signed_max = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    np.testing.assert_allclose(scales, signed_max / -8, rtol=1e-6)
    np.testing.assert_array_equal(q, np.clip(np.rint(blocks / scales[..., None]), -8, 7))


def test_block_size_is_checked(lowered) -> None:
    with pytest.raises(PassError, match="block_size 48 is not one of"):
        _quantized(lowered, block_size=48)
