"""graphopt compare: build several recipes of one model from one trace and measure each.

    load + trace once ──► for each recipe: run its passes on a copy of the trace ──► artifact
                                                              │
    fidelity vs the fp32 PyTorch model (reference logits computed once) ◄─┘
    speed: every artifact timed in interleaved rounds (graphopt.evaluate.compare_measure)

Build time per recipe is its passes plus writing the artifact; loading and tracing happen once and are
reported separately. The first recipe is the reference: every recipe's timings are also stored as ratios to it
(``relative``, with ``relative_interval``), which is what the gate compares between runs, beside the cost
model, which is exact. With an int4 recipe, ONNX Runtime's own int4 (its MatMulNBitsQuantizer, GenAI's builder)
is measured beside it as ungated peer rows (graphopt.evaluate.compare_peers).
Artifacts go to ``OUT/artifacts/<recipe>``;
compare.json / compare.md / compare.png are written by the CLI once everything is measured.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from graphopt.build.artifact import BuildOptions, Loaded, build_traced, load, trace_loaded
from graphopt.quant.text import CALIB_TOKENS, CORPUS_NAME, EVAL_TOKENS, Corpus, default_corpus, default_corpus_sha256, \
    read_text_file, token_stream
from graphopt.evaluate.compare_measure import ReferenceLogits, SpeedSettings, artifact_fidelity, time_artifacts
from graphopt.evaluate.compare_peers import FIDELITY_KEYS, PEERS, measure_peers
from graphopt.evaluate.cost_model import cost_model
from graphopt.core.errors import RecipeError
from graphopt.evaluate.gate import FORMAT, CompareError, Thresholds, thresholds
from graphopt.passes.pipeline import Recipe, load_recipe
from graphopt.core.progress import Progress
from graphopt.targets import get_target

FORMAT_VERSION = 2  # 2: speed intervals, timing rounds, cost model


@dataclasses.dataclass(frozen=True)
class CompareOptions:
    recipes: tuple[str, ...]
    model: str
    out: Path
    target: str = "ort-cpu"
    calib_text: Path | None = None
    calib_tokens: int = CALIB_TOKENS
    eval_text: Path | None = None
    eval_tokens: int = EVAL_TOKENS
    speed: SpeedSettings = SpeedSettings()
    attn_implementation: str = "sdpa"
    peers: tuple[str, ...] = PEERS  # with an int4 recipe: ONNX Runtime's int4 as ungated rows (compare_peers)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything checked before the model is loaded: recipes, their gate thresholds, the texts."""
    recipes: list[Recipe]
    limits: dict[str, Thresholds]
    eval_corpus: Corpus
    calib_corpus: Corpus | None  # None: no recipe calibrates


def plan(options: CompareOptions, overrides: dict[str, float | None]) -> Plan:
    if not options.recipes:
        raise RecipeError("compare needs at least one recipe, e.g. 'graphopt compare ort-cpu ort-cpu-int8 --model M'")
    recipes = [load_recipe(spec) for spec in options.recipes]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise RecipeError(f"recipes {names} repeat a name; each recipe needs its own name to be compared")
    for recipe in recipes:
        if recipe.target != options.target:
            raise RecipeError(f"recipe {recipe.name} targets {recipe.target!r}, not --target {options.target}; "
                              "compare recipes of one target")
    if not get_target(options.target).measures_fidelity:
        raise CompareError(f"compare measures each artifact on this machine, and {options.target} artifacts need "
                           "other hardware; compare recipes of a target that runs here (ort-cpu)")
    limits = {r.name: thresholds(spec, overrides) for r, spec in zip(recipes, options.recipes)}
    corpus = read_text_file(options.eval_text, "--eval-text") if options.eval_text else default_corpus("evaluation")
    calib = read_text_file(options.calib_text, "--calib-text") if options.calib_text is not None else \
        default_corpus("calibration")  # a bad --calib-text fails now rather than after the trace
    calibrates = any(spec.name == "calibrate" for recipe in recipes for spec in recipe.passes)
    return Plan(recipes, limits, corpus, calib if calibrates else None)


def build_options(recipe: Recipe, options: CompareOptions) -> BuildOptions:
    calibrates = any(spec.name == "calibrate" for spec in recipe.passes)
    return BuildOptions(recipe, options.out / "artifacts" / recipe.name, force=True,
                        attn_implementation=options.attn_implementation,
                        calib_text=options.calib_text if calibrates else None, calib_tokens=options.calib_tokens,
                        eval_tokens=options.eval_tokens, eval_text=options.eval_text)


def prepare(options: CompareOptions, recipes: list[Recipe], progress: Progress) -> tuple[Loaded, list[Any]]:
    """Load the model, run every recipe's preflight and calibration-text checks, then trace once."""
    from graphopt.build import quant as quant_build

    loaded = load(options.model, options.attn_implementation, progress)
    contexts = []
    for recipe in recipes:
        contexts.append(quant_build.context_for(build_options(recipe, options), loaded, progress))
    trace_loaded(loaded, progress)
    return loaded, contexts


def run_compare(options: CompareOptions, chosen: Plan, progress: Progress,
                baseline_dir: Path | None = None) -> dict[str, Any]:
    """Build and measure every recipe of ``chosen``; the compare.json document. ``baseline_dir``: the folder of
    a baseline compare.json, whose artifacts (if still there) are timed beside this run's."""
    from graphopt.measure.bench import benchmark_prompt, machine_info

    loaded, contexts = prepare(options, chosen.recipes, progress)
    ids = token_stream(loaded.tokenizer, chosen.eval_corpus, options.eval_tokens, "--eval-tokens")
    reference = ReferenceLogits(loaded.torch_model)
    entries = []
    for recipe, context in zip(chosen.recipes, contexts):
        built = build_options(recipe, options)
        report = build_traced(loaded, built, progress, context, copy=True)
        fidelity = report.get("fidelity") or artifact_fidelity(built.output, reference, ids,
                                                               chosen.eval_corpus.source, progress)
        speed = options.speed
        cost = cost_model(built.output / "model.onnx", speed.prompt_tokens, speed.prompt_tokens + speed.new_tokens)
        entries.append(entry(recipe, built.output, report, fidelity) | {"cost": cost})
    peers = measure_peers(loaded, options, chosen.recipes, reference, ids, chosen.eval_corpus.source, progress)
    prompt = benchmark_prompt(loaded.tokenizer, options.speed.prompt_tokens)
    artifacts = {e["recipe"]: Path(e["artifact"]) for e in entries}
    twins = baseline_artifacts(baseline_dir, artifacts) if baseline_dir is not None else {}
    timed = time_artifacts(artifacts, prompt, options.speed, progress, twins)
    for item in entries:
        item |= timed["recipes"][item["recipe"]]
    source = loaded.source
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": source.model_id,
            "model_name": model_name(source),
            "model_sha256": source.sha256, "target": options.target, "reference_recipe": entries[0]["recipe"],
            "fidelity_reference": "fp32 PyTorch model (= the fp32 artifact within 1e-4)",
            "eval": {"tokens": int(ids.size), "text": chosen.eval_corpus.source, "sha256": chosen.eval_corpus.sha256},
            "calibration_text": chosen.calib_corpus.to_json() if chosen.calib_corpus else None,
            "corpus": {"name": CORPUS_NAME, "sha256": default_corpus_sha256()},
            "speed_settings": dataclasses.asdict(options.speed), "timing": timed["timing"],
            "timings": {k: round(v, 3) for k, v in loaded.timings.items()},
            "machine": machine_info(), "recipes": entries, "peers": peers,
            "thresholds": {name: dataclasses.asdict(limit) for name, limit in chosen.limits.items()}}


def baseline_artifacts(baseline_dir: Path, artifacts: dict[str, Path]) -> dict[str, Path]:
    """The baseline run's artifact of each recipe, where compare wrote it (``BASELINE/artifacts/RECIPE``; no
    path is taken from the file), if it is still there and is not this run's own (``--out`` = the baseline's)."""
    root = (baseline_dir / "artifacts").resolve()
    twins = {}
    for name, path in artifacts.items():
        candidate = (root / name).resolve()
        if candidate.parent == root and (candidate / "manifest.json").is_file() and candidate != path.resolve():
            twins[name] = candidate
    return twins


def model_name(source: Any) -> str:
    """The model's own name for titles: the hub id its config.json recorded, else its architecture and size
    (``model`` stays the short id: the built-in name, the GGUF stem or the folder's name)."""
    try:
        config = json.loads((Path(source.model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return source.model_id
    recorded = str(config.get("_name_or_path") or "")
    if recorded and not Path(recorded).is_absolute() and not recorded.startswith("."):
        return recorded
    if source.model_id != Path(source.model_dir).name:  # a built-in name or a GGUF file's stem
        return source.model_id
    size = f"{config.get('num_hidden_layers', '?')} layers x {config.get('hidden_size', '?')}"
    return f"{source.architecture} ({size})"


def entry(recipe: Recipe, artifact: Path, report: dict[str, Any], fidelity: dict[str, Any]) -> dict[str, Any]:
    """One recipe's row of compare.json (speed filled in after all are built)."""
    timings = report["timings"]
    return {"recipe": recipe.name, "source": recipe.source, "description": recipe.description,
            "artifact": str(artifact), "precision": report["precision"],
            "fidelity": {k: fidelity[k] for k in FIDELITY_KEYS},
            "artifact_bytes": report["artifact_bytes"],
            "build_s": round(timings["passes_s"] + timings["save_s"], 3),
            "nodes": report["nodes"], "ops": report["ops"]["final"], "passes": report["passes"],
            "pipeline": [{"name": spec.name, **spec.options} for spec in recipe.passes]}
