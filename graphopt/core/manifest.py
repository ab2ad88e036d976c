"""manifest.json: the contract between an artifact and any server that runs it.

A C++ server needs nothing else: the I/O tensors with roles, the KV layout and the
past→present aliases, the model dims, and sha256 of every file.

    {
      "format": "graphopt-artifact", "format_version": 1, "graphopt_version": "0.1.0",
      "source": {"architecture", "model_type", "id", "sha256"},
      "target": "ort-cpu", "precision": {"weights", "activations", "kv_cache"},
      "model": {"num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                "vocab_size", "max_seq", "bos_token_id", "eos_token_ids", "pad_token_id"},
      "io": {"inputs": [{"name", "dtype", "shape", "role", "layer"?}], "outputs": [...]},
      "kv_cache": {"layout": "slot-major BHSD", "dtype", "shape", "aliases": {present: past}, "update": "in-place"},
      "plugins": [], "optimization_profiles": [],
      "graphs": {"multi_token": "model_verify.onnx"},   (ort-cpu, optional: the same I/O contract with standard
                 TensorScatter + Attention for several multi-token rows over a cache; its weights are model.onnx.data)
      "files": {"model.onnx": {"sha256", "bytes"}, ...},  (every file the runtime reads: graphs, weights,
                 tokenizer/*, generation_config.json; paths stay inside the artifact: artifact_files.py)
      "min_runtime": {"onnxruntime": "1.20"}
    }
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from graphopt.core.artifact_files import MANIFEST, artifact_path, file_entries, sha256_file, verify_files
from graphopt.core.errors import ArtifactError
from graphopt.core.manifest_fields import check_fields

FORMAT = "graphopt-artifact"
FORMAT_VERSION = 1
__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "Manifest", "ModelDims", "TensorSpec", "file_entries",
           "load_manifest", "parse_manifest", "sha256_file", "verify_files"]


@dataclasses.dataclass(frozen=True)
class ModelDims:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_seq: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: "int64", "int32", "float32", "float16"
    shape: tuple[str | int, ...]
    role: str
    layer: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "role": self.role}
        if self.layer is not None:
            out["layer"] = self.layer
        return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The parsed manifest. ``raw`` keeps every field, including ones this version does not model."""

    dims: ModelDims
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    target: str
    kv_dtype: str
    raw: dict[str, Any]

    def input(self, role: str, layer: int | None = None) -> TensorSpec:
        return _by_role(self.inputs, role, layer)

    def output(self, role: str, layer: int | None = None) -> TensorSpec:
        return _by_role(self.outputs, role, layer)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self.raw["kv_cache"]["aliases"])

    @property
    def graphs(self) -> dict[str, str]:
        """Extra graphs by use (``multi_token``), paths relative to the artifact."""
        return dict(self.raw.get("graphs") or {})


def _by_role(specs: tuple[TensorSpec, ...], role: str, layer: int | None) -> TensorSpec:
    for spec in specs:
        if spec.role == role and spec.layer == layer:
            return spec
    raise ArtifactError(f"manifest has no tensor with role {role!r} (layer {layer}); rebuild the artifact")


def load_manifest(artifact: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check ``artifact/manifest.json``; raise :class:`ArtifactError` naming what to rebuild."""
    directory = Path(artifact)
    if not directory.is_dir():
        raise ArtifactError(f"artifact {str(directory)!r} is not a directory; build one with 'graphopt build MODEL -o {directory}'")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; '{directory}' is not a graphopt artifact (rebuild with 'graphopt build')")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({str(exc)[:80]}); rebuild the artifact with "
                            "'graphopt build'") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path} holds {type(raw).__name__}, not a JSON object; rebuild the artifact with "
                            "'graphopt build'")
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format {raw.get('format')!r} v{raw.get('format_version')!r} is not {FORMAT!r} v{FORMAT_VERSION}; "
            "rebuild the artifact with this graphopt version"
        )
    if verify_hashes:
        verify_files(directory, raw.get("files"))
    manifest = parse_manifest(raw)
    for key, name in manifest.graphs.items():
        artifact_path(directory, name, f"graphs.{key}")
        if verify_hashes and name not in raw["files"]:
            raise ArtifactError(f"{path}: graphs.{key} {name!r} is not listed in 'files', so its hash cannot be "
                                "checked; rebuild the artifact with 'graphopt build'")
    return manifest


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """The typed manifest; ArtifactError naming the first field of the wrong type or range."""
    check_fields(raw)
    try:
        model = raw["model"]
        dims = ModelDims(**{**model, "eos_token_ids": tuple(model["eos_token_ids"])})
        inputs = tuple(_spec(item) for item in raw["io"]["inputs"])
        outputs = tuple(_spec(item) for item in raw["io"]["outputs"])
        return Manifest(dims, inputs, outputs, raw["target"], raw["kv_cache"]["dtype"], raw)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"manifest.json is missing or has a malformed field ({exc}); rebuild the artifact") from None


def _spec(item: dict[str, Any]) -> TensorSpec:
    return TensorSpec(item["name"], item["dtype"], tuple(item["shape"]), item["role"], item.get("layer"))
