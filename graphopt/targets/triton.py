"""``graphopt export triton ARTIFACT REPO_DIR``: a Triton Inference Server model repository for an artifact.

    REPO_DIR/<name>/config.pbtxt        platform, I/O tensors (names, TYPE_*, dims; -1 = dynamic),
                                        one GPU instance group per TensorRT optimization profile,
                                        parameters: the KV aliases and manifest facts a client needs
    REPO_DIR/<name>/1/model.plan        (trt artifact with engine.plan)  platform tensorrt_plan
    REPO_DIR/<name>/1/model.onnx[.data] (otherwise)                      platform onnxruntime_onnx
    REPO_DIR/<name>/manifest.json       the artifact's manifest, for clients

The server is stateless: each request carries past_* and gets present_* back (the same buffers in
the artifact's contract). ``max_batch_size`` is 0 because the batch dimension is explicit in every
tensor. The config text is parsed with Triton's own ``model_config.proto`` (from ``tritonclient``),
so a field Triton does not know fails here, not at server start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graphopt.core.errors import ArtifactError, GraphoptError
from graphopt.core.manifest import MANIFEST, Manifest, TensorSpec, load_manifest

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "int8": "TYPE_INT8", "bool": "TYPE_BOOL"}


class TritonExportError(GraphoptError):
    """The artifact cannot be written as a valid Triton model repository."""


def config_text(manifest: Manifest, name: str, platform: str, max_batch: int) -> str:
    """config.pbtxt for ``manifest`` (text format of Triton's ModelConfig)."""
    lines = [f'name: "{name}"', f'platform: "{platform}"', "max_batch_size: 0"]
    lines += [_tensor("input", spec) for spec in manifest.inputs]
    lines += [_tensor("output", spec) for spec in manifest.outputs]
    profiles = list(manifest.optimization_profiles) if platform == "tensorrt_plan" else []
    kind = "KIND_GPU" if manifest.target == "trt" else "KIND_CPU"
    groups = [f'instance_group {{ count: 1 kind: {kind} profile: "{i}" }}' for i in range(len(profiles))]
    lines += groups or [f"instance_group {{ count: 1 kind: {kind} }}"]
    params = {"graphopt_aliases": json.dumps(manifest.aliases), "graphopt_max_batch": str(max_batch),
              "graphopt_target": manifest.target, "graphopt_kv_dtype": manifest.kv_dtype,
              "graphopt_eos_token_ids": json.dumps(list(manifest.dims.eos_token_ids))}
    lines += [f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _tensor(kind: str, spec: TensorSpec) -> str:
    if spec.dtype not in TRITON_TYPES:
        raise TritonExportError(f"tensor {spec.name!r} has dtype {spec.dtype}, which Triton has no TYPE_ for; "
                                "rebuild the artifact")
    dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in spec.shape)
    return f'{kind} {{ name: "{spec.name}" data_type: {TRITON_TYPES[spec.dtype]} dims: [ {dims} ] }}'


def parse_config(text: str):
    """Parse config.pbtxt with Triton's ModelConfig schema; TritonExportError naming the problem."""
    from google.protobuf import text_format

    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise TritonExportError("checking config.pbtxt needs tritonclient; pip install 'graphopt[trt]'") from None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonExportError(f"config.pbtxt does not match Triton's model_config schema: {exc}; report it") from None


def check_config(config, manifest: Manifest) -> None:
    """The parsed config names every manifest tensor exactly once, with its Triton type and rank."""
    for declared, specs in ((config.input, manifest.inputs), (config.output, manifest.outputs)):
        by_name = {t.name: t for t in declared}
        if len(by_name) != len(declared) or set(by_name) != {s.name for s in specs}:
            raise TritonExportError("config.pbtxt tensors do not match manifest.json; report it")
        for spec in specs:
            tensor = by_name[spec.name]
            if tensor.data_type != _enum(config, TRITON_TYPES[spec.dtype]) or len(tensor.dims) != len(spec.shape):
                raise TritonExportError(f"config.pbtxt tensor {spec.name!r} disagrees with the manifest; report it")


def _enum(config, name: str) -> int:
    return type(config).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"] \
        .enum_type.values_by_name[name].number


def export_triton(artifact: str | Path, repo_dir: str | Path, name: str | None = None, max_batch: int = 8) -> Path:
    """Write REPO_DIR/<name>/ for the artifact; returns that folder."""
    directory = Path(artifact)
    manifest = load_manifest(directory)
    name = name or directory.resolve().name
    engine = (manifest.trt or {}).get("engine")
    platform = "tensorrt_plan" if engine else "onnxruntime_onnx"
    text = config_text(manifest, name, platform, max_batch)
    check_config(parse_config(text), manifest)
    model_dir = Path(repo_dir) / name
    if model_dir.exists() and any(model_dir.iterdir()):
        raise ArtifactError(f"{model_dir} exists and is not empty; choose another REPO_DIR or --name, or remove it")
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    files = {"engine.plan": "model.plan"} if engine else {"model.onnx": "model.onnx", "model.onnx.data": "model.onnx.data"}
    for src, dst in files.items():
        if (directory / src).exists():
            shutil.copyfile(directory / src, model_dir / "1" / dst)
    shutil.copyfile(directory / MANIFEST, model_dir / MANIFEST)
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir


def triton_summary(config) -> dict[str, Any]:
    """What a test or a user reads back: platform and tensor names."""
    return {"platform": config.platform, "inputs": [t.name for t in config.input],
            "outputs": [t.name for t in config.output]}
