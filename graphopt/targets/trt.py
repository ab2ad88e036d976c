"""``trt``: TensorRT (and TensorRT-RTX), run by runtime/engine_trt.py's TrtEngine on an NVIDIA GPU.

    recipes      models/trt[-int4|-int8|-fp8].toml: lower-trt (fp16/bf16, static cache), then check-trt
    options      --attention --dtype --trt-max-seq --trt-max-batch --trt-max-prefill --aot-check
                 (targets/trt_options.py), set on the recipe's lower-trt pass before anything loads
    manifest     "trt", "plugins", "optimization_profiles", "min_runtime" (targets/trt_manifest.py)
    post-build   --aot-check: TensorRT-RTX parses and AOT-builds for the named archs; with full TensorRT
                 and a GPU here, engine.plan is built into the artifact (targets/trt_aot.py)
    fidelity     not measured at build time: OrtEngine cannot run TensorRT's graph here
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.targets.base import Target, TargetError
from graphopt.targets.trt_options import TrtOptions, apply_trt_options, check_no_kv_quant, check_trt_options

if TYPE_CHECKING:
    import onnx_ir as ir


class Trt(Target):
    name = "trt"
    description = "TensorRT / TensorRT-RTX on an NVIDIA GPU"
    engine = "graphopt.runtime.engine_trt:TrtEngine"
    options = TrtOptions
    measures_fidelity = False

    def configure(self, recipe, flags: dict[str, Any]):
        recipe, options = super().configure(recipe, flags)
        check_trt_options(options)
        check_no_kv_quant(recipe)
        if options.aot_check is not None:
            from graphopt.targets.trt_aot import parse_archs

            parse_archs(options.aot_check)
        return apply_trt_options(recipe, options), options

    def check_graph(self, model: ir.Model, recipe) -> None:
        if "check-trt" not in {p.name for p in recipe.passes}:
            raise TargetError(f"recipe {recipe.name} targets trt without 'check-trt'; add it at the end of the recipe")

    def manifest_fields(self, model: ir.Model, manifest, options, results) -> dict[str, Any]:
        from graphopt.targets.trt_manifest import trt_fields

        return trt_fields(model, manifest, results.trt_profiles)

    def finish(self, staging: Path, options, output: Path) -> list[str]:
        from graphopt.targets.trt_aot import aot_check, build_engine, full_tensorrt, parse_archs

        options = options or TrtOptions()
        results = aot_check(staging, parse_archs(options.aot_check)) if options.aot_check else []
        lines = [f"aot {r.arch}: TensorRT-RTX parsed in {r.parse_s:.1f}s, built in {r.build_s:.1f}s "
                 f"({r.engine_bytes / 2**20:.1f} MiB)" for r in results]
        if full_tensorrt() is None:
            return lines + ["wrote ONNX + manifest for TensorRT; on a machine with TensorRT and a GPU run "
                            f"'graphopt engine {output}' to write engine.plan"]
        engine = build_engine(staging, force=True)
        return lines + [f"wrote {output / engine['file']} (TensorRT {engine['tensorrt']}, profiles {engine['profiles']})"]


TARGET = Trt()
