"""TensorRT for a trt artifact: parse + ahead-of-time build (TensorRT-RTX, no GPU), and engine.plan (TensorRT + GPU).

    aot_check(artifact, ["sm89", "sm120"])   parse model.onnx with TensorRT-RTX's ONNX parser and build a
                                             serialized engine for each compute capability, CPU only; any
                                             parser or builder error is a TrtError naming it
    build_engine(artifact)                   with `tensorrt` and a GPU: engine.plan (the manifest's
                                             optimization profiles) + timing.cache, manifest updated

Both read the optimization profiles from manifest.json. The network is strongly typed (the graph
carries explicit casts), so no precision flags are set.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from pathlib import Path
from typing import Any

from graphopt.core.errors import GraphoptError
from graphopt.core.manifest import load_manifest

log = logging.getLogger(__name__)
AOT_ARCHS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")


class TrtError(GraphoptError):
    """TensorRT cannot parse or build an artifact, or is not installed where it is needed."""


@dataclasses.dataclass(frozen=True)
class AotResult:
    arch: str
    parse_s: float
    build_s: float
    engine_bytes: int


def parse_archs(text: str) -> list[str]:
    """'sm89,sm120' (or '89,120') → ['sm89', 'sm120']; a one-line error for anything else."""
    archs = [a.strip().lower() for a in text.split(",") if a.strip()]
    archs = [a if a.startswith("sm") else f"sm{a}" for a in archs]
    bad = [a for a in archs if a not in AOT_ARCHS]
    if bad or not archs:
        raise TrtError(f"--aot-check {text!r}: {bad or 'nothing'} not buildable by TensorRT-RTX ahead of time; "
                       f"use a comma list of {', '.join(AOT_ARCHS)} (no sm90)")
    return archs


def tensorrt_rtx():
    try:
        return importlib.import_module("tensorrt_rtx")
    except ImportError:
        raise TrtError("--aot-check needs TensorRT-RTX; pip install 'graphopt[trt]' (tensorrt-rtx-cu12)") from None


def parse_network(trt, artifact: Path, logger):
    """(builder, network) for artifact/model.onnx, strongly typed; TrtError with the parser's messages."""
    builder = trt.Builder(logger)
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:
        flags = 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(artifact / "model.onnx")):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        raise TrtError(f"TensorRT's ONNX parser rejects {artifact / 'model.onnx'}: {errors}; "
                       "rebuild with --target trt (check-trt should have caught this — report it)")
    return builder, network, parser


def add_profiles(trt, builder, config, network, profiles: list[dict[str, Any]]) -> None:
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for entry in profiles:
        profile = builder.create_optimization_profile()
        for name, shape in entry["shapes"].items():
            if name in names:  # TensorRT drops inputs it finds unused (input_lens)
                profile.set_shape(name, shape["min"], shape["opt"], shape["max"])
        config.add_optimization_profile(profile)


def aot_check(artifact: str | Path, archs: list[str]) -> list[AotResult]:
    """Parse and AOT-build the artifact for each arch with TensorRT-RTX on this (CPU-only) machine."""
    trt = tensorrt_rtx()
    directory = Path(artifact)
    manifest = load_manifest(directory)
    if manifest.target != "trt":
        raise TrtError(f"artifact {directory} targets {manifest.target!r}; --aot-check needs a --target trt build")
    logger = trt.Logger(trt.Logger.ERROR)
    results = []
    for arch in archs:
        start = time.perf_counter()
        builder, network, _parser = parse_network(trt, directory, logger)
        parsed = time.perf_counter()
        config = builder.create_builder_config()
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, arch.upper()), 0)
        add_profiles(trt, builder, config, network, list(manifest.optimization_profiles))
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise TrtError(f"TensorRT-RTX could not build {directory} for {arch} (see the TensorRT log above); "
                           "report it with the artifact's build-report.json")
        results.append(AotResult(arch, parsed - start, time.perf_counter() - parsed, engine.nbytes))
        log.info("aot %s: parse %.1fs build %.1fs", arch, parsed - start, time.perf_counter() - parsed)
    return results


def full_tensorrt():
    """The `tensorrt` module when it and a CUDA GPU are present, else None (TensorRT-RTX cannot run engines here)."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        return None
    return trt if cuda_device_count() > 0 else None


def cuda_device_count() -> int:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def check_plugins(plugins: list[dict[str, Any]], registry) -> None:
    """Every plugin the manifest lists must have a creator in TensorRT's ``registry``."""
    for plugin in plugins:
        creator = registry.get_creator(plugin["name"], plugin["version"], plugin["namespace"])
        if creator is None:
            raise TrtError(f"plugin {plugin['namespace']}::{plugin['name']} v{plugin['version']} is not registered "
                           "with TensorRT; import graphopt.plugins.flash_attention_trt (needs triton) before "
                           "building, or rebuild the artifact with --attention standard")


def check_plan_version(engine: dict[str, Any] | None, installed: str) -> None:
    """A plan only deserializes on the TensorRT version that built it."""
    if engine is None:
        raise TrtError("the artifact has no engine.plan; build it on the GPU machine with 'graphopt engine ARTIFACT'")
    if engine.get("tensorrt") != installed:
        raise TrtError(f"engine.plan was built with TensorRT {engine.get('tensorrt')}, this machine has {installed}; "
                       "rebuild it here with 'graphopt engine ARTIFACT --force'")


def build_engine(artifact: str | Path, force: bool = False) -> dict[str, Any]:
    """engine.plan + timing.cache for the manifest's profiles (TensorRT and a GPU needed); returns trt.engine."""
    from graphopt.targets.trt_manifest import record_engine

    directory = Path(artifact)
    manifest = load_manifest(directory)
    if manifest.target != "trt":
        raise TrtError(f"artifact {directory} targets {manifest.target!r}; rebuild it with --target trt")
    if (directory / "engine.plan").exists() and not force:
        raise TrtError(f"{directory / 'engine.plan'} exists; pass --force to rebuild it")
    trt = full_tensorrt()
    if trt is None:
        raise TrtError("building engine.plan needs the `tensorrt` package and a CUDA GPU; run 'graphopt engine "
                       f"{directory}' on such a machine (this one can --aot-check with TensorRT-RTX)")
    if manifest.plugins:
        importlib.import_module("graphopt.plugins.flash_attention_trt")
        check_plugins(list(manifest.plugins), trt.get_plugin_registry())
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse_network(trt, directory, logger)
    config = builder.create_builder_config()
    cache_path = directory / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    add_profiles(trt, builder, config, network, list(manifest.optimization_profiles))
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TrtError(f"TensorRT could not build {directory} (see its log above); report it with build-report.json")
    (directory / "engine.plan").write_bytes(plan)
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return record_engine(directory, trt.__version__)
