"""manifest.json: the contract between an artifact and any server that runs it.

A C++ server needs nothing else: the I/O tensors with roles, the KV layout and the
past→present aliases, the model dims, and sha256 of every file.

    {
      "format": "graphopt-artifact", "format_version": 1, "graphopt_version": "0.1.0",
      "source": {"architecture", "model_type", "id", "spec", "sha256"},
      "target": "ort-cpu", "recipe": "ort-cpu", "precision": {"weights", "activations", "kv_cache"},
      "model": {"num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                "vocab_size", "max_seq", "bos_token_id", "eos_token_ids", "pad_token_id"},
      "io": {"inputs": [{"name", "dtype", "shape", "role", "layer"?}], "outputs": [...]},
      "kv_cache": {"layout": "slot-major [batch, kv_heads, max_seq, head_dim]", "dtype", "shape", "update": "in-place",
                   "aliases": {present: past}},
      "plugins": [], "optimization_profiles": [],
      "graphs": {"multi_token": "model_verify.onnx"},   (ort-cpu, optional: the same I/O contract with standard
                 TensorScatter + Attention for several multi-token rows over a cache; its weights are model.onnx.data)
      "files": {"model.onnx": {"sha256", "bytes"}, ...},  (every file the runtime reads: graphs, weights,
                 tokenizer/*, generation_config.json; paths stay inside the artifact: artifact_files.py)
      "min_runtime": {"onnxruntime": "1.22"}
    }
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from graphopt.core.artifact_files import (MANIFEST, artifact_path, check_entries, file_entries, sha256_file,
                                          verify_files)
from graphopt.core.errors import ArtifactError
from graphopt.core.manifest_fields import check_fields

FORMAT = "graphopt-artifact"
FORMAT_VERSION = 1
MODELLED = {"format", "format_version", "graphopt_version", "source", "target", "recipe", "precision", "model", "io",
            "kv_cache", "plugins", "optimization_profiles", "min_runtime", "trt", "graphs", "files"}
__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "KvCacheSpec", "Manifest", "ModelDims", "SourceInfo",
           "TensorSpec", "file_entries",
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
class SourceInfo:
    """Where the weights came from (``spec`` is what to pass to ``graphopt build`` again)."""

    architecture: str | None = None
    model_type: str | None = None
    id: str | None = None
    spec: str | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class KvCacheSpec:
    layout: str
    dtype: str
    shape: tuple[str | int, ...]
    update: str
    aliases: dict[str, str]  # present_* output -> the past_* input it is written into

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "dtype": self.dtype, "shape": list(self.shape), "update": self.update,
                "aliases": dict(self.aliases)}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """manifest.json as one typed value: the build writes it with :meth:`to_json`, every consumer reads it
    through :func:`load_manifest` (checked fields, paths inside the artifact) and never through raw dicts.

    ``raw`` is the JSON the manifest was read from (for ``graphopt inspect --json``); ``extra`` keeps
    top-level fields this version does not model, so a manifest rewritten by this version loses nothing.
    """

    dims: ModelDims
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    target: str
    kv_cache: KvCacheSpec
    source: SourceInfo = SourceInfo()
    recipe: str | None = None
    precision: dict[str, Any] = dataclasses.field(default_factory=dict)
    plugins: tuple[dict[str, Any], ...] = ()
    optimization_profiles: tuple[dict[str, Any], ...] = ()
    min_runtime: dict[str, str] = dataclasses.field(default_factory=dict)
    trt: dict[str, Any] | None = None  # trt artifacts: graphopt/targets/trt_manifest.py
    graphs: dict[str, str] = dataclasses.field(default_factory=dict)  # extra graphs by use (``multi_token``)
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # path -> {"sha256", "bytes"}
    graphopt_version: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def kv_dtype(self) -> str:
        return self.kv_cache.dtype

    def input(self, role: str, layer: int | None = None) -> TensorSpec:
        return _by_role(self.inputs, role, layer)

    def output(self, role: str, layer: int | None = None) -> TensorSpec:
        return _by_role(self.outputs, role, layer)

    @property
    def aliases(self) -> dict[str, str]:
        return dict(self.kv_cache.aliases)

    def to_json(self) -> dict[str, Any]:
        """The manifest.json object, fields in a fixed order."""
        out = {"format": FORMAT, "format_version": FORMAT_VERSION, "graphopt_version": self.graphopt_version,
               "source": self.source.to_json(), "target": self.target}
        out |= {"recipe": self.recipe} if self.recipe is not None else {}
        out |= {"precision": dict(self.precision), "model": _dims_json(self.dims),
                "io": {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs]},
                "kv_cache": self.kv_cache.to_json(), "plugins": list(self.plugins),
                "optimization_profiles": list(self.optimization_profiles), "min_runtime": dict(self.min_runtime)}
        out |= {"trt": self.trt} if self.trt is not None else {}
        out |= {"graphs": dict(self.graphs)} if self.graphs else {}
        return out | {"files": dict(self.files)} | self.extra

    def write(self, directory: str | Path) -> None:
        """Write ``directory/manifest.json`` atomically (a temporary file renamed over it)."""
        path = Path(directory) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, path)


def _dims_json(dims: ModelDims) -> dict[str, Any]:
    return {**dataclasses.asdict(dims), "eos_token_ids": list(dims.eos_token_ids)}


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
    if verify_hashes:  # shape, every path inside the artifact, then sizes and sha256
        verify_files(directory, raw.get("files"))
    else:  # shape and paths only
        check_entries(directory, raw.get("files"))
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
        kv = raw["kv_cache"]
        kv_cache = KvCacheSpec(kv.get("layout", ""), kv["dtype"], tuple(kv.get("shape", ())), kv.get("update", ""),
                               dict(kv["aliases"]))
        extra = {k: v for k, v in raw.items() if k not in MODELLED}
        return Manifest(dims, inputs, outputs, raw["target"], kv_cache, _source(raw.get("source") or {}),
                        raw.get("recipe"), dict(raw.get("precision") or {}), tuple(raw.get("plugins") or ()),
                        tuple(raw.get("optimization_profiles") or ()), dict(raw.get("min_runtime") or {}),
                        raw.get("trt"), dict(raw.get("graphs") or {}), dict(raw.get("files") or {}),
                        raw.get("graphopt_version"), extra, raw)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"manifest.json is missing or has a malformed field ({exc}); rebuild the artifact") from None


def _source(source: dict[str, Any]) -> SourceInfo:
    return SourceInfo(**{f.name: source.get(f.name) for f in dataclasses.fields(SourceInfo)})


def _spec(item: dict[str, Any]) -> TensorSpec:
    return TensorSpec(item["name"], item["dtype"], tuple(item["shape"]), item["role"], item.get("layer"))
