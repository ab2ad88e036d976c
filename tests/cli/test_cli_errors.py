"""Bad input gets one line naming the fix, exit code 2, no traceback, and nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner

from graphopt.build.artifact import BuildOptions, build
from graphopt.cli.main import main
from graphopt.passes.pipeline import load_recipe
from graphopt.core.progress import QUIET
from tiny_models import make_tiny_model


def assert_fails(args: list[str], *fragments: str) -> str:
    result = CliRunner().invoke(main, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and lines, result.output
    err = lines[-1]  # progress lines of the steps that ran may come before it
    assert err.startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1, lines
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    source = make_tiny_model("llama", root / "hf")
    build(str(source), BuildOptions(load_recipe("ort-cpu"), root / "artifact"), QUIET)
    return root / "artifact"


def _copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "copy"))


def test_missing_path(tmp_path: Path) -> None:
    assert_fails(["build", str(tmp_path / "nope"), "-o", str(tmp_path / "out")], "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_fails(["build", str(tmp_path / "empty"), "-o", str(tmp_path / "out")], "config.json")
    assert not (tmp_path / "out").exists()


def test_encoder_only_bert_is_refused(tmp_path: Path) -> None:
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, architectures=["BertForMaskedLM"])
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    assert_fails(["build", str(tmp_path / "bert"), "-o", str(tmp_path / "out")], "not a causal LM")
    assert not (tmp_path / "out").exists()


def test_failed_build_leaves_no_directory(tmp_path: Path) -> None:
    source = make_tiny_model("llama", tmp_path / "hf")
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[pass]]\nname = "insert-kv-cache"\n')  # no fuse-attention first: must fail
    assert_fails(["build", str(source), "-o", str(tmp_path / "out"), "--recipe", str(recipe)], "fuse-attention",
                 "layers.0.self_attn", "is not fused", "try --attn-implementation eager")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_force(artifact: Path) -> None:
    assert_fails(["build", "smollm2-135m", "-o", str(artifact)], "--force")


def test_truncated_model_onnx(artifact: Path, tmp_path: Path) -> None:
    copy = _copy(artifact, tmp_path)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(data[: len(data) // 2])
    assert_fails(["generate", str(copy), "w5 w6"], "model.onnx", "rebuild")


def test_manifest_hash_mismatch(artifact: Path, tmp_path: Path) -> None:
    copy = _copy(artifact, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.onnx.data"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_fails(["generate", str(copy), "w5 w6"], "sha256", "rebuild")


def test_prompt_longer_than_context(artifact: Path) -> None:
    prompt = ",".join(["5"] * 300)  # the tiny model's context is 256
    assert_fails(["generate", str(artifact), "--prompt-ids", prompt, "--max-new-tokens", "4"], "256")


@pytest.mark.parametrize("option,value,field", [("--temperature", "-1", "temperature"), ("--top-p", "1.5", "top_p"),
                                                ("--max-new-tokens", "0", "max_new_tokens")])
def test_bad_sampling_value(artifact: Path, option: str, value: str, field: str) -> None:
    assert_fails(["generate", str(artifact), "w5 w6", option, value], field)


def test_bad_prompt_ids(artifact: Path) -> None:
    assert_fails(["generate", str(artifact), "--prompt-ids", "1,x,3"], "--prompt-ids")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--debug", "build", str(tmp_path / "nope")])
    assert result.exit_code != 0 and result.exception is not None


def test_generate_json_and_inspect(artifact: Path) -> None:
    result = CliRunner().invoke(main, ["generate", str(artifact), "--prompt-ids", "5,6,7", "--max-new-tokens", "6",
                                       "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 6 and out["ttft_ms"] > 0 and out["decode_tokens_per_s"] > 0
    assert isinstance(out["text"], str)
    shown = CliRunner().invoke(main, ["inspect", str(artifact)])
    assert shown.exit_code == 0 and "GroupQueryAttention" in shown.stdout and "past_key" in shown.stdout
    listed = CliRunner().invoke(main, ["passes"])
    assert listed.exit_code == 0 and "fuse-attention" in listed.stdout and "rmsnorm" in listed.stdout
    assert "full_range: bool = False" in listed.stdout and "quantize-int4-ort" in listed.stdout


def test_alibi_model_is_refused_before_loading(tmp_path: Path) -> None:
    config = transformers.BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2)
    transformers.BloomForCausalLM(config).save_pretrained(tmp_path / "bloom")
    assert_fails(["build", str(tmp_path / "bloom"), "-o", str(tmp_path / "out")], "ALiBi", "'bloom'")
    assert not (tmp_path / "out").exists()
