"""Quantized builds of a tiny tied Llama end to end: recipes from flags, artifact, fidelity report, eval CLI,
and bad input (one line naming the fix, exit 2, nothing written)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.build.artifact import BuildOptions, build
from graphopt.cli.main import main
from graphopt.core.manifest import load_manifest
from graphopt.passes.pipeline import load_recipe
from graphopt.build.precision import PrecisionFlags, precision_recipe
from graphopt.core.progress import QUIET
from graphopt.quant.text import CORPUS_NAME, default_corpus_sha256
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from tiny_models import make_tiny_model, tiny_calibration_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qbuild")
    hf, words = tiny_calibration_model(root)
    build(str(hf), BuildOptions(load_recipe("ort-cpu"), root / "fp32"), QUIET)
    return {"root": root, "hf": hf, "words": words, "fp32": root / "fp32"}


def _build(tiny, name: str, flags: PrecisionFlags) -> tuple[dict, Path]:
    out = tiny["root"] / name
    options = BuildOptions(precision_recipe(flags, None, "ort-cpu"), out, calib_text=tiny["words"], calib_tokens=1024,
                           eval_text=tiny["words"], eval_tokens=512)
    return build(str(tiny["hf"]), options, QUIET), out


@pytest.fixture(scope="module")
def int4(tiny) -> tuple[dict, Path]:
    return _build(tiny, "int4", PrecisionFlags(int4=True))


def test_int4_artifact_runs_within_budget(tiny, int4) -> None:
    report, out = int4
    ops = report["ops"]["final"]
    assert ops["com.microsoft::MatMulNBits"] == 2 * 5 + 1 and ops["com.microsoft::GatherBlockQuantized"] == 1
    assert "MatMul" not in ops and "DequantizeLinear" not in ops and "RotaryEmbedding" not in ops  # packed q/k/v
    manifest = load_manifest(out)
    assert manifest.raw["precision"]["weights"] == "int4 block 32 symmetric full-range (awq)"
    assert manifest.raw["recipe"] == "ort-cpu-int4" and "calibration.npz" in manifest.raw["files"]
    with np.load(out / "calibration.npz") as stats:
        assert stats["meta"][0] == 1024 and str(stats["source"]).startswith("file:")
    fidelity = report["fidelity"]
    assert fidelity["tokens"] == 510 and fidelity["budget"]["within"], fidelity
    assert 0 <= fidelity["kl_mean"] <= 0.05 and fidelity["top1_agreement"] >= 0.93
    assert report["calibration"]["tokens"] == 1024 and report["timings"]["fidelity_s"] > 0
    words = hashlib.sha256(tiny["words"].read_bytes()).hexdigest()
    text = report["text"]  # the texts used, and the built-in corpus's hashes in every report
    assert text["calibration"] == {"source": f"file:{tiny['words']}", "sha256": words, "tokens": 1024}
    assert text["evaluation"] == {"source": f"file:{tiny['words']}", "sha256": words, "tokens": 510}
    assert text["corpus"] == {"name": CORPUS_NAME, "sha256": default_corpus_sha256()}
    fp32 = json.loads((tiny["fp32"] / "build-report.json").read_text())["text"]
    assert fp32 == text | {"calibration": None, "evaluation": None}
    (result,) = LLM(out, max_slots=1, max_seq=64).generate([[5, 6, 7]], SamplingParams(max_new_tokens=8))
    assert len(result.token_ids) == 8
    assert out.stat().st_size and (out / "model.onnx.data").stat().st_size < (out.parent / "fp32" /
                                                                               "model.onnx.data").stat().st_size / 4


@pytest.mark.parametrize("flags,weights,kv", [
    (PrecisionFlags(int8=True, kv_cache="int8"), "int8 block 32 symmetric", "int8 per-layer"),
    (PrecisionFlags(fp8=True, kv_cache="fp8"), "fp8 e4m3 per-channel", "fp8 e4m3 per-layer"),
])
def test_int8_and_fp8_builds_with_a_quantized_kv_cache(tiny, flags, weights: str, kv: str) -> None:
    report, out = _build(tiny, f"{flags.weights}-kv", flags)
    precision = load_manifest(out).raw["precision"]
    assert precision["weights"] == weights and precision["kv_cache"].startswith(kv)
    assert report["recipe"] == f"ort-cpu-{flags.weights}+kv-{flags.kv_cache}"
    assert report["fidelity"]["budget"]["within"], report["fidelity"]
    ops = report["ops"]["final"]
    if flags.int8:  # the KV Q/DQ sits between RoPE and attention, so q/k/v stay unpacked (and say why)
        assert ops["com.microsoft::MatMulNBits"] == 2 * 7 + 1 and "MatMul" not in ops
        assert len([n for n in report["unfused"] if n.startswith("fuse-qkv-rope")]) == 2
    else:
        assert ops["MatMul"] == 15 and "fidelity simulation" in precision["note"]


def test_eval_cli_compares_with_the_fp32_build(tiny, int4) -> None:
    result = CliRunner().invoke(main, ["eval", str(int4[1]), "--reference", str(tiny["fp32"]), "--text",
                                       str(tiny["words"]), "--tokens", "512", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tokens"] == 510 and 0 <= out["kl_mean"] < 0.05 and out["top1_agreement"] > 0.9
    assert out["ppl_reference"] > 1 and out["precision"]["weights"].startswith("int4")
    # the build measured against PyTorch on the same text: the fp32 artifact matches it
    assert abs(out["kl_mean"] - int4[0]["fidelity"]["kl_mean"]) < 1e-3


def assert_fails(args: list[str], *fragments: str) -> None:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize("flags,fragments", [
    (["--fp8", "--int4"], ["--int4 and --fp8 cannot be combined", "pick one"]),
    (["--int8", "--int4"], ["cannot be combined"]),
    (["--int4", "--int4-block", "48"], ["--int4-block 48 is not supported", "32, 64 or 128"]),
    (["--int4-block", "64"], ["only applies to --int4"]),
    (["--int4", "--recipe", "ort-cpu"], ["drop --recipe"]),
    (["--kv-cache", "fp16"], ["--kv-cache fp16", "fp8 or int8"]),
])
def test_bad_flags_fail_before_loading(tiny, tmp_path: Path, flags: list[str], fragments: list[str]) -> None:
    assert_fails(["build", str(tiny["hf"]), "-o", str(tmp_path / "out"), *flags], *fragments)
    assert not (tmp_path / "out").exists()


def test_block_that_does_not_divide_the_model(tmp_path: Path) -> None:
    hf = make_tiny_model("llama", tmp_path / "hf")  # hidden 64
    assert_fails(["build", str(hf), "-o", str(tmp_path / "out"), "--int4", "--int4-block", "128"],
           "--int4-block 128 does not divide the model's hidden_size 64", "use --int4-block 32 or 64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing half-written


@pytest.mark.parametrize("content,fragments", [
    (b"", ["is empty"]), (b"   \n\t\n", ["is empty"]),
    ("caf\u00e9 au lait".encode("latin-1"), ["is not UTF-8", "iconv"]),
])
def test_unusable_calibration_text(tiny, tmp_path: Path, content: bytes, fragments: list[str]) -> None:
    text = tmp_path / "calib.txt"
    text.write_bytes(content)
    assert_fails(["build", str(tiny["hf"]), "-o", str(tmp_path / "out"), "--int4", "--calib-text", str(text)],
           "--calib-text", *fragments)
    assert_fails(["build", str(tiny["hf"]), "-o", str(tmp_path / "out"), "--int4", "--calib-text", str(tmp_path / "no")],
           "no such file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


def test_calibration_text_for_a_recipe_that_does_not_calibrate(tiny, tmp_path: Path) -> None:
    assert_fails(["build", str(tiny["hf"]), "-o", str(tmp_path / "out"), "--calib-text", str(tiny["words"])],
           "no 'calibrate' pass", "drop --calib-text")


def test_eval_refuses_artifacts_of_different_models(tiny, int4, tmp_path: Path) -> None:
    other = Path(shutil.copytree(tiny["fp32"], tmp_path / "other"))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"]["sha256"] = "0" * 64  # as if built from other weights
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert_fails(["eval", str(int4[1]), "--reference", str(other), "--text", str(tiny["words"])], "different weights")
