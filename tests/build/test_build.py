"""The artifact directory: manifest contents, hashes, --dump-after, --force replacement."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir

from graphopt.build.artifact import BuildOptions, build
from graphopt.core.manifest import load_manifest, sha256_file
from graphopt.passes.pipeline import load_recipe
from graphopt.core.progress import QUIET
from tiny_models import make_tiny_model


def test_artifact_layout_manifest_and_dump(tmp_path: Path) -> None:
    source = make_tiny_model("qwen2", tmp_path / "hf")
    out = tmp_path / "art"
    options = BuildOptions(load_recipe("ort-cpu"), out, dump_after="fuse-attention")
    report = build(str(source), options, QUIET)
    assert sorted(p.name for p in out.iterdir()) == [
        "build-report.json", "generation_config.json", "manifest.json", "model.onnx", "model.onnx.data",
        "model_verify.onnx", "tokenizer"]
    manifest = load_manifest(out)
    raw = manifest.raw
    assert json.dumps(manifest.to_json(), indent=2) == (out / "manifest.json").read_text()  # one typed manifest
    assert manifest.recipe == "ort-cpu" and manifest.source.architecture == "Qwen2ForCausalLM"
    assert raw["source"]["architecture"] == "Qwen2ForCausalLM" and raw["target"] == "ort-cpu"
    assert manifest.dims.num_layers == 2 and manifest.dims.num_kv_heads == 2 and manifest.dims.head_dim == 16
    assert manifest.dims.max_seq == 256 and manifest.dims.eos_token_ids == (2,)
    assert raw["kv_cache"]["aliases"]["present_key.1"] == "past_key.1"
    roles = {s.role for s in manifest.inputs}
    assert roles == {"input_ids", "position_ids", "cache_lens", "input_lens", "logit_positions", "past_key", "past_value"}
    assert manifest.input("cache_lens").dtype == "int32" and manifest.output("logits").shape == ("batch", "num_logits", 96)
    assert raw["files"]["model.onnx.data"]["sha256"] == sha256_file(out / "model.onnx.data")
    # the multi-token graph: listed and hashed, and its weights are model.onnx's (no second copy on disk)
    assert raw["graphs"] == {"multi_token": "model_verify.onnx"}
    assert raw["files"]["model_verify.onnx"]["sha256"] == sha256_file(out / "model_verify.onnx")
    assert _external(out / "model_verify.onnx") == _external(out / "model.onnx") != {}
    assert set(_external(out / "model_verify.onnx").values()) == {"model.onnx.data"}
    assert (out / "model_verify.onnx").stat().st_size < (out / "model.onnx").stat().st_size + 16384
    assert json.loads((out / "build-report.json").read_text())["nodes"] == report["nodes"]
    dumped = ir.load(tmp_path / "art.fuse-attention.onnx")
    assert [n.op_type for n in dumped.graph].count("FlashAttention") == 2


def _external(path: Path) -> dict[str, str]:
    """initializer name → the file its data is in, for initializers stored outside the .onnx file."""
    proto = onnx.load(path, load_external_data=False)
    return {t.name: dict((e.key, e.value) for e in t.external_data)["location"] for t in proto.graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_force_replaces_atomically(tmp_path: Path) -> None:
    source = make_tiny_model("llama", tmp_path / "hf")
    out = tmp_path / "art"
    build(str(source), BuildOptions(load_recipe("ort-cpu"), out), QUIET)
    first = (out / "manifest.json").read_text()
    make_tiny_model("llama", source, seed=1)  # new weights, same folder
    build(str(source), BuildOptions(load_recipe("ort-cpu"), out, force=True), QUIET)
    assert (out / "manifest.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "hf"]  # no staging or old copies left


def test_a_trt_build_leaves_the_shared_trace_in_fp32(tmp_path: Path) -> None:
    """compare and the matrix build several recipes from one trace: lower-trt's fp16 must not leak back."""
    from graphopt.build import quant as quant_build
    from graphopt.build.artifact import build_traced, load, trace_loaded

    source = make_tiny_model("llama", tmp_path / "hf")
    loaded = load(str(source), "sdpa", QUIET)
    trace_loaded(loaded, QUIET)
    for recipe in ("trt", "ort-cpu"):
        options = BuildOptions(load_recipe(recipe), tmp_path / recipe)
        build_traced(loaded, options, QUIET, quant_build.context_for(options, loaded, QUIET), copy=True)
    assert ir.DataType.FLOAT16 not in {v.dtype for v in loaded.model.graph.initializers.values()}
    manifest = json.loads((tmp_path / "ort-cpu" / "manifest.json").read_text())
    assert manifest["kv_cache"]["dtype"] == "float32"
