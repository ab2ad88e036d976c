"""check-trt names the offending node; the trt build options and engine steps fail with one-line errors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.core.errors import PassError
from graphopt.passes.check_trt import CheckTrtPass
from graphopt.targets.trt_aot import TrtError, check_plan_version, check_plugins, parse_archs
from trt_helpers import built

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def _model(nodes: list[ir.Node], inputs: list[ir.Value], opset: int = 24) -> ir.Model:
    graph = ir.Graph(inputs, [nodes[-1].outputs[0]], nodes=nodes, opset_imports={"": opset})
    return ir.Model(graph, ir_version=10)


def _x(name: str = "x", dtype: ir.DataType = F16, rank: int = 4) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(["b", 2, "s", 8][:rank]))


def _const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(array, name=name))


def assert_fails(model: ir.Model, *fragments: str) -> str:
    with pytest.raises(PassError) as info:
        CheckTrtPass()(model)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


def test_fp16_attention_passes() -> None:
    q, k, v = _x("q"), _x("k"), _x("v")
    result = CheckTrtPass()(_model([ir.node("Attention", [q, k, v], name="attn")], [q, k, v]))
    assert result.modified is False


def test_fp32_attention_fails_by_name() -> None:
    q, k, v = _x("q", F32), _x("k", F32), _x("v", F32)
    model = _model([ir.node("Attention", [q, k, v], name="attn_fp32")], [q, k, v])
    assert_fails(model, "'attn_fp32'", "fp32 attention")


def test_attention_with_past_fails() -> None:
    q, k, v, pk, pv = (_x(n) for n in ("q", "k", "v", "pk", "pv"))
    node = ir.node("Attention", [q, k, v, None, pk, pv], num_outputs=3, name="attn_past")
    model = _model([node], [q, k, v, pk, pv])
    model.graph.outputs.extend(node.outputs[1:])
    assert_fails(model, "'attn_past'", "past/present")


def test_newer_than_opset_24_fails() -> None:
    x, axis = _x(), _const("axis", np.array(0, np.int64))
    model = _model([ir.node("CumProd", [x, axis], name="cumprod_26")], [x])
    assert_fails(model, "'cumprod_26'", "newer than ONNX opset 24")
    y = _x("y")
    assert_fails(_model([ir.node("Relu", [y], name="relu")], [y], opset=26), "opset 26")


def test_custom_op_and_bad_quantization_fail() -> None:
    x = _x()
    assert_fails(_model([ir.node("Gelu", [x], domain="com.example", name="mine")], [x]), "'mine'", "Plugin not found")
    x = None
    w = _const("w", np.ones((8, 8), np.int8))
    zp = _const("zp", np.full((8,), 3, np.int8))
    scale = _const("s", np.ones((8,), np.float16))
    dq = ir.node("DequantizeLinear", [w, scale, zp], attributes={"axis": 1}, name="dq_zp")
    assert_fails(_model([dq], []), "'dq_zp'", "constant zero")
    w4 = ir.Value(name="w4", const_value=ir.Tensor(np.ones((8, 8), np.int8), dtype=ir.DataType.INT4, name="w4"))
    dq4 = ir.node("DequantizeLinear", [w4, scale], attributes={"axis": 1}, name="dq_int4")
    assert_fails(_model([dq4], []), "'dq_int4'", "block_size")


def test_unsupported_node_in_a_built_graph_fails_by_name() -> None:
    model = ir.load(built("trt") / "model.onnx")
    CheckTrtPass()(model)  # the built graph passes as is
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    axis = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(0, np.int64))})
    bad = ir.node("CumProd", [logits.producer().inputs[0], axis.outputs[0]], name="deliberately_unsupported")
    model.graph.extend([axis, bad])
    assert_fails(model, "'deliberately_unsupported'", "CumProd")


@pytest.mark.parametrize("args,fragment", [
    (["--target", "trt", "--dtype", "float32"], "no fused fp32 attention"),
    (["--attention", "plugin"], "only apply to --target trt"),
    (["--trt-max-batch", "2"], "--trt-max-batch only apply to --target trt"),
    (["--target", "trt", "--aot-check", "sm90"], "no sm90"),
    (["--target", "trt", "--kv-cache", "fp8"], "--kv-cache fp8 is not supported with --target trt"),
])
def test_build_option_errors_before_loading(args: list[str], fragment: str, tmp_path) -> None:
    result = CliRunner().invoke(main, ["build", str(tmp_path / "no-such-model"), *args])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and fragment in line, line


def test_plugin_library_missing_and_plan_version() -> None:
    class EmptyRegistry:
        def get_creator(self, name, version, namespace):
            return None

    plugin = {"name": "FlashAttention", "namespace": "graphopt", "version": "1"}
    with pytest.raises(TrtError, match="graphopt::FlashAttention v1 is not registered.*--attention standard"):
        check_plugins([plugin], EmptyRegistry())
    with pytest.raises(TrtError, match="built with TensorRT 10.13.0, this machine has 10.14.1.*graphopt engine"):
        check_plan_version({"tensorrt": "10.13.0"}, "10.14.1")
    check_plan_version({"tensorrt": "10.14.1"}, "10.14.1")
    assert parse_archs("89, sm120") == ["sm89", "sm120"]


def test_engine_command_without_tensorrt_says_how_to_finish() -> None:
    from graphopt.targets.trt_aot import full_tensorrt

    if full_tensorrt() is not None:
        pytest.skip("this machine has TensorRT and a GPU: the engine builds instead")
    result = CliRunner().invoke(main, ["engine", str(built("trt"))])
    line = result.stderr.strip().splitlines()[-1]
    assert result.exit_code == 2 and "needs the `tensorrt` package and a CUDA GPU" in line, result.output


def test_recipe_name_beside_a_folder_of_that_name(tmp_path, monkeypatch) -> None:
    from graphopt.passes.pipeline import load_recipe

    (tmp_path / "trt").mkdir()  # e.g. the output of 'graphopt build … --target trt -o trt'
    monkeypatch.chdir(tmp_path)
    assert load_recipe("trt").target == "trt"
