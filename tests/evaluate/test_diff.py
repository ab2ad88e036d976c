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
