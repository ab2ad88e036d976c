"""graphopt build: source → trace → pipeline → artifact directory, written atomically.

Everything is produced in a temporary directory beside the destination and renamed into place
at the end; on any failure (or Ctrl-C) the temporary directory is removed, so a half-written
artifact never exists under the destination name. ``--force`` replaces only a graphopt artifact, and what a
killed build left behind is swept by the next build into the same parent (graphopt/build/staging.py).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt import __version__
from graphopt.core.artifact_files import runtime_file_names
from graphopt.build.features import features_of
from graphopt.core.manifest import KvCacheSpec, Manifest, SourceInfo, file_entries
from graphopt.passes.base import PipelineResults
from graphopt.passes.pipeline import PassRecord, Recipe, run_pipeline
from graphopt.core.progress import Progress
from graphopt.quant.text import CALIB_TOKENS, EVAL_TOKENS
from graphopt.targets import Target, get_target
from graphopt.build.staging import check_destination, make_staging, swap_into_place, sweep_leftovers

@dataclasses.dataclass(frozen=True)
class BuildOptions:
    recipe: Recipe
    output: Path
    force: bool = False
    verify: bool = False
    dump_after: str | None = None
    attn_implementation: str = "sdpa"
    calib_text: Path | None = None  # calibration text (default: the built-in corpus, graphopt/quant/text.py)
    calib_tokens: int = CALIB_TOKENS
    eval_tokens: int = EVAL_TOKENS  # fidelity vs fp32, measured for every lossy (quantized) build
    eval_text: Path | None = None  # default: the built-in corpus's evaluation split
    experts: str = "routed"  # how mixture-of-experts blocks are traced: graphopt/build/experts.py FORMS
    target: str | None = None  # graphopt/targets: None means the recipe's own target
    target_options: Any = None  # the target's options dataclass (Target.configure), None for its defaults
    kl_budget: float | None = None  # --kl-budget: the fidelity budget is this KL alone (build/quant.py)

    @property
    def target_name(self) -> str:
        return self.target or self.recipe.target


@dataclasses.dataclass
class Loaded:
    """A model loaded and traced once; ``build_traced`` runs any number of recipes on copies of the trace."""
    source: Any
    torch_model: Any
    tokenizer: Any
    timings: dict[str, float]
    model: ir.Model | None = None
    traced_ops: dict[str, int] = dataclasses.field(default_factory=dict)


def build(spec: str, options: BuildOptions, progress: Progress,
          on_pass: Callable[[PassRecord], None] | None = None) -> dict[str, Any]:
    """Build ``spec`` into ``options.output``; returns the build report."""
    from graphopt.build import quant as quant_build

    check_destination(options.output, options.force)
    corpus = quant_build.calibration_corpus(options.recipe, options.calib_text)
    quant_build.check_keep_quant(options.recipe, spec)
    loaded = load(spec, options.attn_implementation, progress)
    context = quant_build.pass_context(options, corpus, loaded.torch_model.config, loaded.tokenizer, progress,
                                       loaded.source)
    trace_loaded(loaded, progress, options.experts)
    return build_traced(loaded, options, progress, context, on_pass)


def load(spec: str, attn_implementation: str, progress: Progress) -> Loaded:
    """Resolve the source and load the fp32 PyTorch model and its tokenizer."""
    from graphopt import sources

    timings: dict[str, float] = {}
    with progress.step("resolving model source"):
        source = sources.resolve_source(spec)
    with progress.step(f"loading {source.model_id} (fp32)"), _timed(timings, "load_s"):
        torch_model = sources.load_causal_lm(source, attn_implementation=attn_implementation)
        tokenizer = sources.load_tokenizer(source)
    return Loaded(source, torch_model, tokenizer, timings)


def trace_loaded(loaded: Loaded, progress: Progress, experts: str = "routed") -> None:
    from graphopt.build.trace import trace

    with progress.step("tracing with torch.onnx.export(dynamo=True, opset 23)"), _timed(loaded.timings, "trace_s"):
        loaded.model = trace(loaded.torch_model, experts=experts)
    loaded.traced_ops = _op_counts(loaded.model)


def build_traced(loaded: Loaded, options: BuildOptions, progress: Progress, context,
                 on_pass: Callable[[PassRecord], None] | None = None, copy: bool = False,
                 finalize: Callable[[dict[str, Any]], None] = lambda report: None) -> dict[str, Any]:
    """Run ``options.recipe`` on the trace (on a copy of it when ``copy``) and write the artifact.
    ``finalize`` sees the report before the artifact goes live; raising there leaves nothing written."""
    from graphopt.build import quant as quant_build

    source, torch_model, tokenizer = loaded.source, loaded.torch_model, loaded.tokenizer
    model = clone_model(loaded.model) if copy else loaded.model
    timings, started = dict(loaded.timings), time.perf_counter() - sum(loaded.timings.values())
    with progress.step(f"running pipeline {options.recipe.name}"), _timed(timings, "passes_s"):
        results = PipelineResults()  # what the passes hand to the writer
        records = run_pipeline(model, options.recipe, dump_after=options.dump_after,
                               dump_path=options.output.with_name(f"{options.output.name}.{options.dump_after}.onnx"),
                               verify=options.verify, on_pass=on_pass, torch_model=torch_model, context=context,
                               results=results)
    target = get_target(options.target_name)
    target.check_graph(model, options.recipe)
    check_destination(options.output, options.force)  # again: it may have appeared while the passes ran
    sweep_leftovers(options.output.parent)
    staging = make_staging(options.output)
    try:
        with progress.step("writing artifact"), _timed(timings, "save_s"):
            report = _write(staging, model, source, torch_model, tokenizer, options, target, records, results,
                            loaded.traced_ops, timings)
        if any(r.lossy for r in records) and not target.measures_fidelity:
            report["fidelity_skipped"] = f"not measured for {target.name} artifacts (their engine needs other hardware)"
        elif any(r.lossy for r in records):  # quantized: compared with fp32 before the artifact goes live
            report["fidelity"] = quant_build.measure_fidelity(staging, torch_model, tokenizer, options, progress,
                                                              timings)
        report["text"] = quant_build.text_record(options, context, report.get("fidelity"))
        steps = target.finish(staging, options.target_options, options.output)  # post-build, before going live
        report |= {"target_steps": steps} if steps else {}
        finalize(report)  # may refuse the artifact: then nothing goes live
        timings["total_s"] = time.perf_counter() - started
        report["timings"] = {k: round(v, 3) for k, v in timings.items()}
        (staging / "build-report.json").write_text(json.dumps(report, indent=2))
        swap_into_place(staging, options.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _write(staging: Path, model: ir.Model, source, torch_model, tokenizer, options: BuildOptions, target: Target,
           records: list[PassRecord], results: PipelineResults, traced_ops: dict[str, int],
           timings: dict[str, float]) -> dict[str, Any]:
    from graphopt.build.quant import save_calibration

    ir.save(model, staging / "model.onnx", external_data="model.onnx.data")
    tokenizer.save_pretrained(staging / "tokenizer")
    torch_model.generation_config.to_json_file(staging / "generation_config.json")
    calibration = save_calibration(results, staging)
    names = ["model.onnx"] + (["model.onnx.data"] if (staging / "model.onnx.data").exists() else [])
    names += [calibration["file"]] if calibration else []
    manifest = _manifest(model, results, source, torch_model.config, torch_model.generation_config, options.recipe,
                         target.name)
    manifest = dataclasses.replace(manifest, **target.manifest_fields(model, manifest, options.target_options, results))
    graphs = target.extra_graphs(staging, model)
    names += list(graphs.values()) + runtime_file_names(staging)  # tokenizer/, generation_config.json
    manifest = dataclasses.replace(manifest, graphs=graphs, files=file_entries(staging, names))
    manifest.write(staging)
    ops = _op_counts(model)
    features = features_of(model, records, traced_ops, dataclasses.asdict(manifest.dims))
    return {
        "graphopt_version": __version__, "source": manifest.source.to_json(), "recipe": options.recipe.name,
        "target": target.name, "nodes": {"traced": sum(traced_ops.values()), "final": sum(ops.values())},
        "ops": {"traced": traced_ops, "final": ops}, "passes": [r.to_json() for r in records],
        "pipeline": [{"name": spec.name, **spec.options} for spec in options.recipe.passes],  # for graphopt diff
        "unfused": [note for r in records for note in r.notes], "features": features,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "artifact_bytes": sum(e["bytes"] for e in manifest.files.values()),
        "precision": manifest.precision, "calibration": calibration,
    }


def _manifest(model: ir.Model, results: PipelineResults, source, config, generation_config, recipe: Recipe,
              target: str) -> Manifest:
    """The manifest's common fields (the target adds its own, the files come last)."""
    from graphopt.build.quant import precision_of
    from graphopt.core.io_contract import io_specs, model_dims

    inputs, outputs = io_specs(model)
    kv = next(s for s in inputs if s.role == "past_key")
    aliases = {o.name: o.name.replace("present_", "past_") for o in outputs if o.role.startswith("present_")}
    return Manifest(
        dims=model_dims(model, config, generation_config), inputs=tuple(inputs), outputs=tuple(outputs),
        target=target, recipe=recipe.name, graphopt_version=__version__,
        kv_cache=KvCacheSpec("slot-major [batch, kv_heads, max_seq, head_dim]", kv.dtype, kv.shape, "in-place",
                             aliases),
        source=SourceInfo(source.architecture, source.model_type, source.model_id, _absolute_spec(source.spec),
                          source.sha256),
        precision=precision_of(results, kv.dtype), min_runtime={"onnxruntime": "1.22"})


def _absolute_spec(spec: str) -> str:
    """What to pass to resolve_source later from any directory: a built-in name, or an absolute path."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def clone_model(model: ir.Model) -> ir.Model:
    """A copy of the trace that passes may change freely. onnx-ir's clone shares weight tensors (fine:
    passes replace them, never write into them) and each value's type object, so a pass setting a dtype
    (lower-trt's fp16) would retype the original too: every value gets its own TensorType here."""
    copy = model.clone()
    values = [*copy.graph.inputs, *copy.graph.initializers.values()]
    values += [out for node in ir.traversal.RecursiveGraphIterator(copy.graph) for out in node.outputs]
    for value in values:
        if isinstance(value.type, ir.TensorType):
            value.type = ir.TensorType(value.type.dtype)
    return copy


def _op_counts(model: ir.Model) -> dict[str, int]:
    counts = collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph)
    return dict(sorted(counts.items()))


class _timed:
    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.key] = time.perf_counter() - self.start
