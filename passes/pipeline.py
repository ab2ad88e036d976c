"""Pipelines as data: a TOML recipe lists passes with options; the runner instruments them.

The runner (not the passes) records per pass: modified, node delta, wall time, stats and notes;
``dump_after`` writes the graph after a named pass; ``verify`` checks the graph after every pass
(onnx checker, shape inference, and logits on ONNX Runtime against the previous stage; a pass
that declares itself ``lossy`` — quantization — has its logit change recorded, not enforced).
Build inputs that passes need (calibration tokens, progress) travel in one explicit PassContext.
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt.core.errors import PassError, RecipeError
from graphopt.passes import REGISTRY, pass_options
from graphopt.passes.base import PassContext, PipelineResults


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    target: str
    passes: tuple[PassSpec, ...]
    description: str = ""
    source: str = ""
    budget: tuple[float, float | None] | None = None  # [budget] kl_max, top1_min: overrides the precision's


@dataclasses.dataclass
class PassRecord:
    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    stats: dict[str, int]
    notes: list[str]
    max_abs_diff: float | None = None
    lossy: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("graphopt.models").iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe name (``models/<name>.toml``) or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():  # a folder named like a recipe (out dir "trt") is not one
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; pass a TOML file or one of {builtin_recipes()}")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        entry = resources.files("graphopt.models") / f"{name_or_path}.toml"
        if not entry.is_file():
            raise RecipeError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin_recipes())}")
        text, source = entry.read_text(encoding="utf-8"), f"models/{name_or_path}.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {source} is not valid TOML ({exc}); fix the file") from None
    return parse_recipe(data, source)


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    entries = data.get("pass")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"recipe {source} has no [[pass]] entries; list passes as [[pass]] name = \"cleanup\"")
    passes = tuple(_pass_spec(entry, source) for entry in entries)
    return Recipe(data.get("name", Path(source).stem), data.get("target", "ort-cpu"), passes,
                  data.get("description", ""), source, _budget(data.get("budget"), source))


def _budget(table: Any, source: str) -> tuple[float, float | None] | None:
    """A recipe's own fidelity budget: ``[budget] kl_max = 0.01`` (nats, > 0), ``top1_min = 0.95`` (optional,
    in (0, 1]); it replaces the budget of the weights' precision in the build report."""
    if table is None:
        return None
    fix = "write e.g. [budget] kl_max = 0.01, top1_min = 0.95"
    if not isinstance(table, dict) or set(table) - {"kl_max", "top1_min"} or "kl_max" not in table:
        raise RecipeError(f"recipe {source}: [budget] takes kl_max and optionally top1_min; {fix}")
    kl_max, top1_min = table["kl_max"], table.get("top1_min")
    if not isinstance(kl_max, (int, float)) or isinstance(kl_max, bool) or kl_max <= 0:
        raise RecipeError(f"recipe {source}: [budget] kl_max = {kl_max!r} should be a number > 0; {fix}")
    if top1_min is not None and (not isinstance(top1_min, (int, float)) or isinstance(top1_min, bool)
                                 or not 0 < top1_min <= 1):
        raise RecipeError(f"recipe {source}: [budget] top1_min = {top1_min!r} should be in (0, 1]; {fix}")
    return float(kl_max), None if top1_min is None else float(top1_min)


def _pass_spec(entry: dict[str, Any], source: str) -> PassSpec:
    name = entry.get("name")
    if name not in REGISTRY:
        raise RecipeError(f"recipe {source}: unknown pass {name!r}; see 'graphopt passes' for the list")
    options = {k: v for k, v in entry.items() if k != "name"}
    known = pass_options(REGISTRY[name])
    for key, value in options.items():
        if key not in known:
            raise RecipeError(f"recipe {source}: pass {name!r} has no option {key!r}; options: {sorted(known)}")
        kind = known[key][0]
        if kind in (int, float, bool, str) and not isinstance(value, kind):
            raise RecipeError(f"recipe {source}: option {name}.{key} = {value!r} should be {kind.__name__}")
    return PassSpec(name, options)


Hook = Callable[[PassRecord], None]


def run_pipeline(model: ir.Model, recipe: Recipe, *, dump_after: str | None = None, dump_path: Path | None = None,
                 verify: bool = False, on_pass: Hook | None = None, torch_model=None,
                 context: PassContext | None = None, results: PipelineResults | None = None) -> list[PassRecord]:
    """Run the recipe's passes in order on ``model`` (in place) and return one record per pass.

    What the passes hand on (calibration, precision, trt profiles) lands in ``results`` (fresh if not given)."""
    from graphopt.passes.verify import StageChecker

    checker = StageChecker(model, torch_model) if verify else None
    records: list[PassRecord] = []
    context = dataclasses.replace(context or PassContext(), results=results or PipelineResults())
    for spec in recipe.passes:
        record = _run_one(model, spec, [r.name for r in records], context)
        if checker is not None:
            record.max_abs_diff = checker.check(model, spec.name, [r.name for r in records], lossy=record.lossy)
        records.append(record)
        if on_pass is not None:
            on_pass(record)
        if dump_after == spec.name and dump_path is not None:
            ir.save(model, dump_path, external_data=dump_path.name + ".data")
    if dump_after is not None and dump_after not in {s.name for s in recipe.passes}:
        raise RecipeError(f"--dump-after {dump_after!r}: no such pass in recipe {recipe.name}")
    return records


def _run_one(model: ir.Model, spec: PassSpec, before: list[str], context: PassContext) -> PassRecord:
    instance = REGISTRY[spec.name](**spec.options)
    instance.context = context
    nodes_before = model.graph.num_nodes()
    start = time.perf_counter()
    try:
        result = instance(model)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError, PassError) as exc:
        raise PassError(f"pass {spec.name!r} failed after [{', '.join(before)}]: {_cause(exc)}") from exc
    except Exception as exc:  # a bug in a pass: name it and where it ran
        raise PassError(f"pass {spec.name!r} crashed after [{', '.join(before)}]: {type(exc).__name__}: {exc}; "
                        "rerun with --debug and report it") from exc
    seconds = time.perf_counter() - start
    return PassRecord(spec.name, bool(result.modified), nodes_before, model.graph.num_nodes(), seconds,
                      dict(instance.stats), list(instance.notes), lossy=bool(instance.lossy and result.modified))


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None and not isinstance(exc, PassError):
        exc = exc.__cause__
    return str(exc)
