"""graphopt diff between recipes and between (hand-written) artifacts; bad input is one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.evaluate.diff import diff, load_side


def invoke(*args: str):
    return CliRunner().invoke(main, ["diff", *args])


def test_recipes_added_passes_aligned() -> None:
    result = invoke("ort-cpu", "ort-cpu-int4")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "--- recipe ort-cpu", "+++ recipe ort-cpu-int4",
        "+ pass 6: calibrate", "+ pass 7: quantize-int4",
        "+ pass 9: lower-quant-ort-cpu", "+ pass 10: fuse-qkv-rope"]


def test_changed_options_and_identical_recipes(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[2] / "models" / "ort-cpu-int4.toml").read_text()
    coarse = tmp_path / "coarse.toml"
    coarse.write_text(text.replace("block_size = 32", "block_size = 128").replace('"awq"', '"rtn"'))
    result = invoke("ort-cpu-int4", str(coarse))
    assert result.exit_code == 0, result.output
    assert "~ pass 7/7 quantize-int4: block_size: 32 -> 128, method: 'awq' -> 'rtn'" in result.output.splitlines()
    same = invoke("ort-cpu", "ort-cpu")
    assert same.exit_code == 0 and "passes and options: identical" in same.output


def fake_artifact(directory: Path, recipe: str, ops: dict[str, int], weights: str) -> Path:
    directory.mkdir()
    pipeline = [{"name": "cleanup"}, {"name": "lower-ort-cpu", "rmsnorm": True}]
    report = {"recipe": recipe, "pipeline": pipeline, "passes": [{"name": p["name"]} for p in pipeline],
              "ops": {"final": ops}, "nodes": {"final": sum(ops.values())}, "artifact_bytes": 2**20,
              "precision": {"weights": weights, "kv_cache": "float32"}}
    (directory / "build-report.json").write_text(json.dumps(report))
    return directory


def test_artifacts_op_counts_and_precision(tmp_path: Path) -> None:
    a = fake_artifact(tmp_path / "a", "x", {"MatMul": 7, "Add": 3}, "fp32")
    b = fake_artifact(tmp_path / "b", "y", {"com.microsoft::MatMulNBits": 7, "Add": 3}, "int4 block 32")
    result = diff(load_side(str(a)), load_side(str(b)))
    assert result["passes"] == [] and result["ops"] == {"MatMul": [7, 0], "com.microsoft::MatMulNBits": [0, 7]}
    assert result["precision"] == {"weights": ["fp32", "int4 block 32"]} and result["nodes"] == [10, 10]
    out = invoke(str(a), str(b)).output.splitlines()
    assert "~ op MatMul: 7 -> 0 (-7)" in out and "~ precision weights: fp32 -> int4 block 32" in out


def test_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for args, message in (([str(tmp_path / "empty"), "ort-cpu"], "without build-report.json"),
                          (["ort-cpu", "no-such-recipe"], "unknown recipe 'no-such-recipe'")):
        result = invoke(*args)
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "build-report.json").write_text("{")
    result = invoke(str(tmp_path / "broken"), "ort-cpu")
    assert result.exit_code == 2 and "unreadable" in result.output and result.output.count("\n") == 1


def graph(directory: Path, weight_type: int) -> None:
    """model.onnx: logits = Gather(emb, ids) @ W, W [8, 16] of ``weight_type``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.ones((16, 8), np.float32), "emb")
    w = numpy_helper.from_array(np.ones((8, 16), helper.tensor_dtype_to_np_dtype(weight_type)), "w")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("Cast", ["x"], ["xc"], to=weight_type),
             helper.make_node("MatMul", ["xc", "w"], ["logits"])]
    io = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
          helper.make_tensor_value_info("logits", weight_type, ["batch", "seq", 16])]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], [emb, w]))
    onnx.save(model, directory / "model.onnx")


def test_artifacts_cost_model(tmp_path: Path) -> None:
    a = fake_artifact(tmp_path / "a", "x", {"MatMul": 1}, "fp32")
    b = fake_artifact(tmp_path / "b", "y", {"MatMul": 1}, "fp16")
    graph(a, 1)  # float32
    graph(b, 10)  # float16: the MatMul reads half the bytes; the Gather still reads one float32 row of emb
    result = diff(load_side(str(a)), load_side(str(b)))
    assert result["cost"]["totals"]["decode_weight_bytes"] == [4 * 8 + 4 * 8 * 16, 4 * 8 + 2 * 8 * 16]
    assert result["cost"]["by_op"]["decode_weight_bytes"] == {"MatMul": [4 * 8 * 16, 2 * 8 * 16]}
    assert result["cost"]["totals"]["decode_flops_per_token"] == [2 * 8 * 16] * 2
    out = invoke(str(a), str(b)).output.splitlines()
    assert "~ cost decode_weight_bytes: 544 -> 288 (-47.1%)" in out and "~   MatMul: 512 -> 256" in out
    assert "  cost decode_flops_per_token: 256 -> 256" in out
