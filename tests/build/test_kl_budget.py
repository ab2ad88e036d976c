"""``graphopt build --kl-budget``: the search (pure), the ranking and recipe it produces, layer pinning in a TOML
recipe, and a tiny tied Llama end to end — met budget, unreachable budget (exit 1, nothing written), bad flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.build.artifact import BuildOptions, build
from graphopt.build.mixed_layers import (Step, assignment, grid_of, kernel_activation_block, rank_steps, recipe_for,
                                         step_bits, target_float_bits)
from graphopt.build.mixed_precision import TOLERANCE, build_within_budget, search_promotions
from graphopt.build.precision import PrecisionFlags, precision_recipe
from graphopt.cli.main import main
from graphopt.core.progress import QUIET
from graphopt.passes.pipeline import load_recipe
from graphopt.quant.numerics import pack_uint4, quantize_int
from graphopt.quant.sensitivity import Grid, block_int8, ladder_errors
from tiny_models import tiny_calibration_model


def test_search_finds_the_smallest_k_within_tolerance_in_few_probes() -> None:
    n, budget = 422, 0.05
    kl = lambda k: 1.0 / (k + 1)  # noqa: E731  falls as k grows; the smallest k within budget is 19
    found = search_promotions(kl, n, budget)
    assert found.met and kl(found.chosen) <= budget and 19 <= found.chosen <= 19 + max(1, found.chosen // TOLERANCE)
    assert len(found.probes) <= 2 + math.ceil(math.log2(math.log(n) / math.log(1 + 1 / TOLERANCE))) + 1
    assert search_promotions(kl, n, 2.0).probes == {0: 1.0}  # the plain build is within: one probe
    near_all = search_promotions(lambda k: 0.02 if k < 200 else 0.0, 211, 0.01)  # not "promote everything"
    assert near_all.met and 200 <= near_all.chosen <= 200 + 200 // TOLERANCE and near_all.chosen < 211


def test_search_reports_the_best_kl_when_the_budget_is_out_of_reach() -> None:
    found = search_promotions(lambda k: 0.5 - k / 1000, 100, 0.01)
    assert not found.met and found.chosen == 100 and found.kl == pytest.approx(0.4)
    assert sorted(found.probes) == [0, 100]


def test_ranking_promotes_the_largest_error_first_and_climbs_each_ladder_in_order(tmp_path: Path) -> None:
    errors = {"a": {"int4": 0.04, "int8": 0.0002, "float": 0.0}, "b": {"int4": 0.01, "int8": 0.00005, "float": 0.0}}
    steps = rank_steps(errors)
    assert [(s.layer, s.to) for s in steps] == [("a", "int8"), ("b", "int8"), ("a", "float"), ("b", "float")]
    assert [s.layer for s in rank_steps({**errors, "lm_head": {"int4": 1e-5, "int8": 0.0, "float": 0.0}})][:2] == \
        ["lm_head", "lm_head"]
    assert assignment(steps, 3) == {"a": "float", "b": "int8"} and assignment(steps, 0) == {}
    pinned = _pinned_recipe(tmp_path)
    recipe = recipe_for(pinned, _index(pinned), assignment(steps, 3))
    options = recipe.passes[_index(recipe)].options
    assert options["keep"] == ["lm_head", "model.layers.0.*", "a"] and options["promote"] == ["model.layers.1.mlp.*", "b"]
    assert assignment([Step("x", "float", 1.0), Step("x", "int8", 2.0)], 2) == {"x": "float"}


def test_ranking_per_added_bit_prefers_cheap_steps() -> None:
    """With layer sizes, a promotion is ranked by the error it removes per bit it adds: a small layer's int8 step
    before a large one's that removes a little more, every int4 → int8 step before the fp32 steps that remove
    about as much, and the lm_head's first step still first (its float step takes its turn by cost)."""
    errors = {"big": {"int4": 0.05, "int8": 0.002, "float": 0.0}, "small": {"int4": 0.04, "int8": 0.0015, "float": 0.0},
              "lm_head": {"int4": 1e-3, "int8": 1e-5, "float": 0.0}}
    sizes = {"big": (4096, 32), "small": (256, 32), "lm_head": (65536, 32)}
    assert step_bits(sizes["big"], "int4", "int8") == 4096 * 4 and step_bits(sizes["big"], "int8", "float") == 4096 * 24
    ranked = [(s.layer, s.at, s.to) for s in rank_steps(errors, sizes)]
    assert ranked == [("lm_head", "int4", "int8"), ("small", "int4", "int8"), ("big", "int4", "int8"),
                      ("small", "int8", "float"), ("big", "int8", "float"), ("lm_head", "int8", "float")]
    by_error = [(s.layer, s.to) for s in rank_steps(errors)]  # without sizes: the old order, lm_head's steps first
    assert by_error[:2] == [("lm_head", "int8"), ("lm_head", "float")] and by_error[2] == ("big", "int8")
    assert step_bits((100, 16), "fp8", "float") == 800  # an fp16 target's float step


def test_a_promotion_costs_the_targets_float_width() -> None:
    """TensorRT recipes lower to float16 (a float step of fp8 adds 8 bits, not 24); ort-cpu keeps the traced fp32."""
    fp8 = load_recipe("trt-fp8")
    index = next(i for i, spec in enumerate(fp8.passes) if spec.name == "quantize-fp8")
    assert target_float_bits(fp8, index) == 16
    int4 = load_recipe("ort-cpu-int4")
    assert target_float_bits(int4, next(i for i, s in enumerate(int4.passes) if s.name == "quantize-int4")) is None

    class Float32:
        dtype = "float32"
    assert target_float_bits(fp8, index, Float32()) == 32  # the command line's --dtype wins


def test_proxy_errors_fall_up_the_ladder() -> None:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((16, 64)).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32)
    int4 = ladder_errors(x, w, Grid("int4", 32), "int4")
    assert int4["int4"] > 50 * int4["int8"] > 0 and int4["float"] == 0.0
    fp8 = ladder_errors(x, w, Grid("fp8", 0), "fp8", amax=float(np.abs(x).max()))
    assert list(fp8) == ["fp8", "float"] and 0 < fp8["fp8"] < int4["int4"]
    full = ladder_errors(x, w, Grid("int4", 32, full_range=True), "int4")  # the recipe's 16-level grid: finer
    assert full["int4"] < int4["int4"] and full["int8"] == int4["int8"]


def test_the_proxy_rounds_on_the_recipe_grid() -> None:
    spec = next(s for s in load_recipe("ort-cpu-int4").passes if s.name == "quantize-int4")
    assert grid_of(spec).full_range is bool(spec.options.get("full_range")) is True


def _matmul_nbits_acc4(x: np.ndarray, q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """ONNX Runtime's MatMulNBits (4 bits, accuracy_level 4) of x [R, K] by int4 blocks q [K, N] with scales
    [K/block, N]."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    (k, n), blocks = q.shape, q.shape[0] // block
    packed = pack_uint4(q.T.reshape(n, blocks, block)).reshape(n, blocks, block // 2)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [x.shape[0], n])],
                              [onnx.numpy_helper.from_array(packed, "B"),
                               onnx.numpy_helper.from_array(np.ascontiguousarray(scale.T).ravel(), "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_the_int4_proxy_rounds_the_input_as_onnx_runtimes_int8_kernel_does() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 128)).astype(np.float32)
    x[:, 5] *= 60.0  # an outlier channel, as in real activations: its block's other inputs lose precision
    w = rng.standard_normal((128, 64)).astype(np.float32)
    quantized = quantize_int(w, 4, axis=0, block_size=32)
    w_hat = quantized.dequantize()
    got = _matmul_nbits_acc4(x, quantized.q.astype(np.int8), quantized.scale.astype(np.float32), 32)
    exact, modelled = x @ w_hat, block_int8(x, 32) @ w_hat
    assert np.abs(got - modelled).max() < 1e-3 * np.abs(got - exact).max()  # the kernel is the model, not x @ Ŵ
    # hand-checked rounding: one block of 4, amax 2.54 → step 0.02
    assert np.allclose(block_int8(np.array([[2.54, 0.011, -0.009, 1.0]], np.float32), 4),
                       [[2.54, 0.02, -0.0, 1.0]], atol=1e-6)

    plain, kernel = Grid("int4", 32), Grid("int4", 32, activation_block=32)
    errors, with_kernel = ladder_errors(x, w, plain, "int4"), ladder_errors(x, w, kernel, "int4")
    assert errors["int4"] > errors["int8"] > 0  # weight-only: no per-tensor int8 input on the int4 ladder
    assert with_kernel["int8"] > errors["int8"] and with_kernel["float"] == 0.0  # the float step drops the rounding
    assert kernel_activation_block(load_recipe("ort-cpu-int4"), _int4_index("ort-cpu-int4")) == 32
    assert kernel_activation_block(load_recipe("trt-int4"), _int4_index("trt-int4")) == 0  # no int8 kernel there


def _int4_index(name: str) -> int:
    return next(i for i, s in enumerate(load_recipe(name).passes) if s.name == "quantize-int4")


def _pinned_recipe(tmp: Path):
    text = Path(load_recipe("ort-cpu-int4").source).read_text()
    text = text.replace('name = "quantize-int4"\n', 'name = "quantize-int4"\nkeep = ["lm_head", "model.layers.0.*"]\n'
                        'promote = ["model.layers.1.mlp.*"]\n')
    path = tmp / "pinned.toml"
    path.write_text(text)
    return load_recipe(str(path))


def _index(recipe) -> int:
    return next(i for i, s in enumerate(recipe.passes) if s.name == "quantize-int4")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("klbudget")
    hf, words = tiny_calibration_model(root)
    return {"root": root, "hf": hf, "words": words}


def _options(tiny, recipe, name: str) -> BuildOptions:
    return BuildOptions(recipe, tiny["root"] / name, calib_text=tiny["words"], calib_tokens=1024,
                        eval_text=tiny["words"], eval_tokens=512)


def test_recipe_pins_layers_to_fp32_and_int8_by_name_pattern(tiny) -> None:
    report = build(str(tiny["hf"]), _options(tiny, _pinned_recipe(tiny["root"]), "pinned"), QUIET)
    stats = next(p for p in report["passes"] if p["name"] == "quantize-int4")["stats"]
    assert stats["kept_fp32"] == 8 and stats["promoted_int8"] == 3 and stats["matmuls"] == 4  # + lm_head kept
    assert report["precision"]["kept_layers"] == "8 fp32 (keep)" and report["precision"]["embedding"] == "fp32"
    assert report["precision"]["promoted_layers"] == "3 int8 (promote)"
    ops = report["ops"]["final"]
    assert ops["MatMul"] == 5 + 1 and "com.microsoft::GatherBlockQuantized" not in ops  # layer 0 (q/k/v packed), lm_head


def test_budget_is_met_by_promoting_and_recorded_in_report_and_inspect(tiny) -> None:
    budget = 2e-4  # the plain int4 build of this tiny model measures ~1e-3 on its words
    options = _options(tiny, precision_recipe(PrecisionFlags(int4=True), None, "ort-cpu"), "int4-kl")
    report = build_within_budget(str(tiny["hf"]), options, QUIET, budget=budget)
    mixed = report["mixed_precision"]
    assert mixed["kl_plain"] > budget and mixed["probes"][0] == {"promotions": 0, "kl": mixed["kl_plain"]}
    assert 0 < mixed["promotions"] <= mixed["candidates"] == 2 * mixed["layers"] and mixed["kl_search"] <= budget
    assert report["fidelity"]["kl_mean"] <= budget
    assert report["fidelity"]["budget"] == {"kl_max": budget, "top1_min": None, "within": True, "misses": [],
                                            "from": "--kl-budget"}
    assert mixed["layers_promoted"] == sum(map(len, mixed["promoted"].values()))
    assert mixed["added_weight_bytes"] > 0 and mixed["ranking"].startswith("proxy error removed per bit added")
    stored = json.loads((options.output / "build-report.json").read_text())
    assert stored["mixed_precision"] == json.loads(json.dumps(mixed))
    result = CliRunner().invoke(main, ["inspect", str(options.output)])
    assert result.exit_code == 0 and f"mixed precision (--kl-budget {budget}" in result.output, result.output


def test_unreachable_budget_exits_1_and_writes_nothing(tiny) -> None:
    out = tiny["root"] / "unreachable"
    args = ["build", str(tiny["hf"]), "--int4", "--kv-cache", "int8", "--kl-budget", "1e-9", "-o", str(out),
            "--calib-text", str(tiny["words"]), "--calib-tokens", "1024"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "not met even with every quantized MatMul promoted" in result.output, result.output
    assert "best KL reached is" in result.output and not out.exists()
    assert not [p for p in tiny["root"].iterdir() if p.name.startswith(".unreachable")]


@pytest.mark.parametrize("args, message", [
    (["--kl-budget", "0.05"], "--kl-budget needs a quantized build"),
    (["--fp8", "--kl-budget", "0"], "must be a positive KL"),
    (["--int4", "--kl-budget", "-0.1"], "must be a positive KL"),
])
def test_bad_budget_flags_are_one_line_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["build", str(tmp_path / "missing"), *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
