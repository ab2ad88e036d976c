"""graphopt compare end to end on a tiny random Llama: metrics in compare.json, the gate against a baseline
(passes on a rerun, fails on a more aggressive recipe), --bisect blames the lossy pass, diff of artifacts."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.quant.text import CORPUS_NAME, default_corpus_sha256

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tiny_model  # noqa: E402

LOOSE_TIMING = ["--decode-down", "0.9", "--batch-down", "0.9", "--ttft-up", "9"]  # tiny timings are noise
PASSES = """
[[pass]]
name = "cleanup"
[[pass]]
name = "fuse-attention"
[[pass]]
name = "insert-kv-cache"
[[pass]]
name = "keep-logits"
[[pass]]
name = "cleanup"
[[pass]]
name = "calibrate"
seq_len = 64
sample_rows = 16
[[pass]]
name = "quantize-int4"
block_size = 64
method = "rtn"
embedding = true
[[pass]]
name = "lower-ort-cpu"
rmsnorm = true
[[pass]]
name = "lower-quant-ort-cpu"
accuracy_level = 4
[[pass]]
name = "cleanup"
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    tiny_model.main(root)
    return root


def compare(tiny: Path, *args: str, peers: str = "none"):
    common = ["--model", str(tiny / "hf"), "--calib-text", str(tiny / "words.txt"), "--eval-text",
              str(tiny / "words.txt"), "--eval-tokens", "512", "--calib-tokens", "1024", "--prompt-tokens", "16",
              "--new-tokens", "8", "--min-rounds", "3", "--time-cap", "1", "--peers", peers]
    return CliRunner().invoke(main, ["compare", *args, *common])


@pytest.fixture(scope="module")
def first(tiny: Path) -> Path:
    out = tiny / "first"
    result = compare(tiny, "ort-cpu", "ort-cpu-int8", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_compare_writes_every_metric(tiny: Path, first: Path) -> None:
    data = json.loads((first / "compare.json").read_text())
    words = hashlib.sha256((tiny / "words.txt").read_bytes()).hexdigest()
    assert data["eval"]["sha256"] == words and data["calibration_text"]["sha256"] == words
    assert data["corpus"] == {"name": CORPUS_NAME, "sha256": default_corpus_sha256()}
    assert data["format"] == "graphopt-compare" and data["reference_recipe"] == "ort-cpu"
    assert data["timings"]["trace_s"] > 0 and data["eval"]["tokens"] == 512
    fp32, int8 = data["recipes"]
    assert [fp32["recipe"], int8["recipe"]] == ["ort-cpu", "ort-cpu-int8"]
    for entry in (fp32, int8):
        assert set(entry["fidelity"]) >= {"kl_mean", "top1_agreement", "ppl_reference", "ppl_candidate"}
        assert all(entry["speed"][key] > 0 for key in ("ttft_ms", "decode_tokens_per_s", "batch_tokens_per_s"))
        assert entry["build_s"] > 0 and entry["nodes"]["final"] == sum(entry["ops"].values())
        assert [p["name"] for p in entry["passes"]] == [p["name"] for p in entry["pipeline"]]
        assert all("stats" in p and "seconds" in p for p in entry["passes"])
    assert fp32["fidelity"]["kl_mean"] < 1e-5 < int8["fidelity"]["kl_mean"] < 0.01
    assert fp32["relative"] == {"decode": 1.0, "batch": 1.0, "ttft": 1.0}
    timing = data["timing"]
    assert timing["rounds"] >= 3 and timing["stopped"] in ("precision", "time cap") and timing["confidence"] == 0.95
    for key, (low, high) in int8["relative_interval"].items():
        assert 0 < low <= int8["relative"][key] <= high, (key, low, high)
    for key, (low, high) in int8["speed_range"].items():  # min–max over the rounds (the plot's bars)
        assert 0 < low <= int8["speed"][key] <= high, (key, low, high)
    assert data["model"] == "hf" and data["model_name"] == "LlamaForCausalLM (2 layers x 128)"  # not the folder
    assert "interleaved rounds" in (first / "compare.md").read_text()
    assert int8["artifact_bytes"] < fp32["artifact_bytes"] / 2
    assert int8["ops"]["com.microsoft::MatMulNBits"] > 0 and "com.microsoft::MatMulNBits" not in fp32["ops"]
    markdown = (first / "compare.md").read_text()
    assert "| ort-cpu-int8 |" in markdown and "quantize-int8" in markdown and "gate" not in markdown
    png = (first / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert not list(first.glob(".compare.*"))  # no staging left behind


def test_cost_model_of_the_tiny_artifacts_by_hand(tiny: Path, first: Path) -> None:
    """compare.json's cost figures against counts worked out from config.json (16-token prompt, context 24)."""
    c = json.loads((tiny / "hf" / "config.json").read_text())
    h, i, n, heads, kv, d, v = (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                                c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["vocab_size"])
    p, t = 16, 24
    layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * i  # q, k, v, o, gate, up, down weights
    fp32, int8 = (e["cost"] for e in json.loads((first / "compare.json").read_text())["recipes"])
    ops = fp32["by_op"]
    assert ops["MatMul"]["decode_weight_bytes"] == 4 * (n * layer + v * h)  # + the tied lm_head (transposed at load)
    assert ops["Gather"]["decode_weight_bytes"] == 4 * h  # one embedding row
    norms = ("SimplifiedLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization")
    assert sum(ops[op]["decode_weight_bytes"] for op in norms) == 4 * (2 * n + 1) * h
    assert fp32["decode_kv_bytes"] == int8["decode_kv_bytes"] == n * 2 * kv * t * d * 4
    assert ops["MatMul"]["decode_flops_per_token"] == 2 * (n * layer + v * h)
    assert ops["MatMul"]["prefill_flops_per_token"] == 2 * n * layer + 2 * v * h / p  # logits of the last row only
    attention = ops["com.microsoft::GroupQueryAttention"]
    assert attention["decode_flops_per_token"] == n * 4 * heads * d * t
    assert attention["prefill_flops_per_token"] == n * 4 * heads * d * p
    # int8: 8-bit MatMulNBits, blocks of 32: a byte per weight and a float32 scale per 32; the tied embedding's
    # bytes are the lm_head's (GatherBlockQuantized reads rows of the same tensors)
    assert int8["by_op"]["com.microsoft::MatMulNBits"]["decode_weight_bytes"] == (n * layer + v * h) * (1 + 4 / 32)
    assert int8["by_op"]["com.microsoft::MatMulNBits"]["decode_flops_per_token"] == 2 * (n * layer + v * h)


def test_gate_passes_against_its_own_output(tiny: Path, first: Path) -> None:
    out = tiny / "rerun"
    result = compare(tiny, "ort-cpu", "ort-cpu-int8", "--out", str(out), "--baseline", str(first / "compare.json"),
                     *LOOSE_TIMING)
    assert result.exit_code == 0, result.output
    assert "gate: passed" in result.output and "regression" not in result.output
    assert "**gate: passed**" in (out / "compare.md").read_text()
    for item in json.loads((out / "compare.json").read_text())["recipes"]:  # the baseline's artifacts ran beside
        low, high = item["vs_baseline"]["relative_interval"]["decode"]
        assert item["vs_baseline"]["rounds"] >= 3 and 0 < low <= item["vs_baseline"]["relative"]["decode"] <= high


def test_gate_fails_on_a_more_aggressive_recipe(tiny: Path, first: Path) -> None:
    aggressive = tiny / "aggressive.toml"  # same name as the baseline's int8 recipe, int4 rtn inside
    aggressive.write_text('name = "ort-cpu-int8"\ntarget = "ort-cpu"\n' + PASSES)
    out = tiny / "aggressive"
    # quantized first: the fp32 recipe built after it from the same trace must still match fp32 PyTorch
    result = compare(tiny, str(aggressive), "ort-cpu", "--out", str(out), "--baseline", str(first / "compare.json"))
    assert result.exit_code == 1, result.output
    assert json.loads((out / "compare.json").read_text())["recipes"][1]["fidelity"]["kl_mean"] < 1e-5
    assert "timing not gated: the reference recipe changed (ort-cpu -> ort-cpu-int8)" in result.output
    old = json.loads((first / "compare.json").read_text())["recipes"][1]["fidelity"]["kl_mean"]
    line = next(line for line in result.output.splitlines() if "kl_mean" in line)
    # one line for the recipe: its regressions joined by "; ", KL first
    assert sum(line.startswith("regression:") for line in result.output.splitlines()) == 1, result.output
    match = re.match(r"regression: ort-cpu-int8: kl_mean (\S+) -> (\S+) \(\+[\d.]+%, limit \+20%\)(;|$)", line)
    assert match and float(match[1]) == pytest.approx(old, rel=1e-3) and float(match[2]) > 10 * old, line
    assert "gate: failed" in result.output
    assert "**gate: failed**" in (out / "compare.md").read_text()


def test_int4_recipes_get_onnxruntimes_int4_as_peer_rows(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An int4 recipe brings ORT's MatMulNBitsQuantizer RTN and GenAI's builder int4 as ungated fidelity rows."""
    genai = pytest.importorskip("onnxruntime_genai", reason="the genai peer needs onnxruntime-genai") is not None
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tiny / "cache"))  # GenAI's tiny model is built and cached here
    recipe = tiny / "int4.toml"
    recipe.write_text('name = "tiny-int4"\ntarget = "ort-cpu"\n' + PASSES)
    out = tiny / "peers"
    result = compare(tiny, str(recipe), "--out", str(out), peers="ort-rtn,genai")
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    assert [e["recipe"] for e in data["recipes"]] == ["tiny-int4"]  # peers are not recipes: not timed, not gated
    ort, gen = data["peers"]
    assert ort["name"] == "ort-cpu-int4-ort-rtn" and ort["precision"]["weights"] == "int4 block 64 symmetric (ort-rtn)"
    assert (out / "artifacts" / "peers" / "ort-cpu-int4-ort-rtn" / "manifest.json").is_file()
    assert gen["name"] == "genai-int4" and genai and "block_size=64" in gen["how"] and "accuracy_level=4" in gen["how"]
    tokens = data["recipes"][0]["fidelity"]["tokens"]  # the same evaluation rows
    for peer in (ort, gen):
        assert 0 < peer["fidelity"]["kl_mean"] < 1 and peer["fidelity"]["tokens"] == tokens
        assert peer["artifact_bytes"] > 0
    assert "ort-cpu-int4-ort-rtn (peer)" in result.output and "genai-int4 (peer)" in (out / "compare.md").read_text()


def test_diff_of_two_artifacts(first: Path) -> None:
    result = CliRunner().invoke(main, ["diff", str(first / "artifacts" / "ort-cpu"),
                                       str(first / "artifacts" / "ort-cpu-int8")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "+ pass 7: quantize-int8" in lines and "+ pass 6: calibrate" in lines
    assert any(re.fullmatch(r"~ op com\.microsoft::MatMulNBits: 0 -> \d+ \(\+\d+\)", line) for line in lines)
    assert any(line.startswith("~ precision weights: fp32 -> int8") for line in lines)


@pytest.mark.parametrize("recipe,within,culprit", [("lossy", False, "quantize-int4"), ("ort-cpu", True, None)])
def test_bisect_blames_the_lossy_pass(tiny: Path, recipe: str, within: bool, culprit: str | None) -> None:
    if recipe == "lossy":  # int4, plain rounding, coarse blocks, held to an int8-grade budget
        path = tiny / "lossy.toml"
        path.write_text('name = "lossy-int4"\ntarget = "ort-cpu"\n[gate]\nkl_budget = 0.002\n' + PASSES)
        recipe = str(path)
    out = tiny / f"bisect-{Path(recipe).stem}"
    result = compare(tiny, "--bisect", recipe, "--out", str(out))
    assert result.exit_code == (0 if within else 1), result.output
    data = json.loads((out / "bisect.json").read_text())
    assert data["within_budget"] is within and data["stages"][0]["name"] == "(trace)"
    assert (data["culprit"] or {}).get("pass") == culprit
    kls = [s["fidelity"]["kl_mean"] for s in data["stages"]]
    if culprit:
        index = data["culprit"]["index"]
        assert data["stages"][index]["name"] == "quantize-int4" and max(kls[:index]) < 1e-5 < kls[index]
        assert f"pass {index} 'quantize-int4' broke the KL budget 0.002" in result.output
    else:
        assert max(kls) < 1e-5 and "within the KL budget" in result.output
    assert (out / "bisect.png").read_bytes().startswith(b"\x89PNG")
