"""The manifest fields a trt artifact adds: what a TensorRT server needs besides the I/O contract.

    "trt": {"dtype": "float16", "opset": 24, "strongly_typed": true, "cache_capacity": T,
            "int64_inputs": [...], "engine": null | {"file", "timing_cache", "tensorrt", "profiles"}},
    "plugins": [{"name": "FlashAttention", "namespace": "graphopt", "version": "1", "nodes": L,
                 "implementation": "aot", "fallback": "model-local function"}],
    "optimization_profiles": [{"name": "prefill", "dims": {"batch": [1, 1, 8], ...},
                               "shapes": {"input_ids": {"min": [1, 1], "opt": [...], "max": [...]}, ...}}, ...],
    "min_runtime": {"onnxruntime": "1.22", "tensorrt": "10.13", "tensorrt_rtx": "1.7"}

Profiles give every dynamic input dimension a (min, opt, max) range by its symbol: ``batch`` rows,
``seq`` new tokens per call, ``num_logits`` logit rows per row; the cache length is static.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from graphopt.core.errors import ArtifactError
from graphopt.core.manifest import Manifest

if TYPE_CHECKING:
    import onnx_ir as ir

MIN_TENSORRT = "10.13"  # first TensorRT whose ONNX parser imports Attention-23/TensorScatter-24
MIN_TENSORRT_RTX = "1.7"


@dataclasses.dataclass(frozen=True)
class ProfileRanges:
    """(min, opt, max) per symbolic dimension, for one optimization profile."""

    name: str
    batch: tuple[int, int, int]
    seq: tuple[int, int, int]
    num_logits: tuple[int, int, int]


def default_profiles(max_batch: int = 8, max_prefill: int = 512, max_verify: int = 8) -> list[ProfileRanges]:
    """A prefill profile (long calls, one row of logits) and a decode/verify profile (few tokens, full batch)."""
    return [ProfileRanges("prefill", (1, 1, max_batch), (1, min(128, max_prefill), max_prefill), (1, 1, max_verify)),
            ProfileRanges("decode", (1, max_batch, max_batch), (1, 1, max_verify), (1, 1, max_verify))]


def profile_json(inputs: list[dict[str, Any]], ranges: ProfileRanges) -> dict[str, Any]:
    """One manifest profile: every input's min/opt/max shape from its symbolic dims."""
    dims = {"batch": ranges.batch, "seq": ranges.seq, "num_logits": ranges.num_logits}
    shapes = {}
    for spec in inputs:
        per = []
        for dim in spec["shape"]:
            if isinstance(dim, int):
                per.append((dim, dim, dim))
            elif dim in dims:
                per.append(dims[dim])
            else:
                raise ArtifactError(f"input {spec['name']!r} has a dynamic dimension {dim!r} that no profile covers; "
                                    "rebuild with --target trt so the cache length is static")
        shapes[spec["name"]] = {k: [p[i] for p in per] for i, k in enumerate(("min", "opt", "max"))}
    return {"name": ranges.name, "dims": {k: list(v) for k, v in dims.items()}, "shapes": shapes}


def trt_fields(model: ir.Model, manifest: Manifest, profile_ranges: dict[str, int]) -> dict[str, Any]:
    """The trt-only manifest fields of a just-lowered model (Manifest field -> value, for dataclasses.replace)."""
    from graphopt.plugins.flash_attention_plugin import PLUGIN_NAMESPACE, PLUGIN_VERSION, plugin_nodes

    inputs = [spec.to_json() for spec in manifest.inputs]
    plugins = plugin_nodes(model)
    profiles = default_profiles(**profile_ranges)
    return {
        "trt": {"dtype": manifest.kv_dtype, "opset": model.opset_imports.get("", 0), "strongly_typed": True,
                "cache_capacity": manifest.kv_cache.shape[2],
                "int64_inputs": [s.name for s in manifest.inputs if s.dtype == "int64"], "engine": None},
        "plugins": ({"name": "FlashAttention", "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION,
                     "nodes": len(plugins), "implementation": "aot (Triton kernel, graphopt.plugins.flash_attention_trt)",
                     "fallback": "model-local function (TensorScatter + Attention)"},) if plugins else (),
        "optimization_profiles": tuple(profile_json(inputs, r) for r in profiles),
        "min_runtime": {**manifest.min_runtime, "tensorrt": MIN_TENSORRT, "tensorrt_rtx": MIN_TENSORRT_RTX},
    }


def record_engine(directory, tensorrt_version: str) -> dict[str, Any]:
    """Add engine.plan and timing.cache to the manifest (files + trt.engine); written atomically."""
    from graphopt.core.manifest import file_entries, load_manifest

    manifest = load_manifest(directory, verify_hashes=False)  # the caller just checked them
    engine = {"file": "engine.plan", "timing_cache": "timing.cache", "tensorrt": tensorrt_version,
              "profiles": [p["name"] for p in manifest.optimization_profiles]}
    files = manifest.files | file_entries(directory, ["engine.plan", "timing.cache"])
    dataclasses.replace(manifest, files=files, trt={**(manifest.trt or {}), "engine": engine}).write(directory)
    return engine
