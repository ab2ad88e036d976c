"""graphopt export triton: a model repository whose config.pbtxt parses with Triton's own model_config schema
(tritonclient) and names every manifest tensor with its type; a TensorRT plan when the artifact has one."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.targets.triton import TritonExportError, check_config, config_text, parse_config
from graphopt.core.manifest import load_manifest
from graphopt.targets.trt_manifest import record_engine
from trt_helpers import built

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed ('graphopt[trt]')")


def test_onnx_repository_for_a_trt_artifact_without_plan(tmp_path) -> None:
    artifact = built("trt")
    result = CliRunner().invoke(main, ["export", "triton", str(artifact), str(tmp_path / "repo"), "--name", "tiny"])
    assert result.exit_code == 0, result.output
    model_dir = tmp_path / "repo" / "tiny"
    assert (model_dir / "1" / "model.onnx").is_file() and (model_dir / "manifest.json").is_file()
    config = parse_config((model_dir / "config.pbtxt").read_text())
    manifest = load_manifest(artifact)
    assert config.name == "tiny" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
    assert [t.name for t in config.input] == [s.name for s in manifest.inputs]
    past = next(t for t in config.input if t.name == "past_key.0")
    types = type(config).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    assert list(past.dims) == [-1, 2, 256, 16] and types.values_by_number[past.data_type].name == "TYPE_FP16"
    logits = next(t for t in config.output if t.name == "logits")
    assert types.values_by_number[logits.data_type].name == "TYPE_FP32" and list(logits.dims) == [-1, -1, 96]
    assert [g.kind for g in config.instance_group] == [1]  # KIND_GPU, no plan: no profiles to pin


def test_plan_repository_with_profiles(tmp_path) -> None:
    artifact = tmp_path / "art"
    shutil.copytree(built("trt"), artifact)
    (artifact / "engine.plan").write_bytes(b"plan bytes")
    (artifact / "timing.cache").write_bytes(b"cache")
    record_engine(artifact, "10.13.0")
    from graphopt.targets.triton import export_triton

    model_dir = export_triton(artifact, tmp_path / "repo")
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and (model_dir / "1" / "model.plan").read_bytes() == b"plan bytes"
    assert [list(g.profile) for g in config.instance_group] == [["0"], ["1"]]
    assert all(g.kind == 1 for g in config.instance_group)  # KIND_GPU
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert '"present_key.0": "past_key.0"' in params["graphopt_aliases"] and params["graphopt_target"] == "trt"


def test_schema_rejects_unknown_fields_and_mismatches() -> None:
    manifest = load_manifest(built("trt"))
    text = config_text(manifest, "m", "onnxruntime_onnx", 8)
    with pytest.raises(TritonExportError, match="model_config schema"):
        parse_config(text.replace("max_batch_size: 0", "max_batch: 0"))
    config = parse_config(text)
    del config.input[0]
    with pytest.raises(TritonExportError, match="do not match manifest"):
        check_config(config, manifest)


def test_existing_model_dir_is_refused(tmp_path) -> None:
    from graphopt.core.errors import ArtifactError
    from graphopt.targets.triton import export_triton

    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "keep").write_text("x")
    with pytest.raises(ArtifactError, match="exists and is not empty"):
        export_triton(built("trt"), tmp_path / "repo", name="m")
