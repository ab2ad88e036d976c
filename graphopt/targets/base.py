"""What a target is: everything graphopt needs to know to build for one runtime and to run the result.

    graphopt build MODEL --target NAME
        │  Target.recipe_name(precision)     which recipe in models/ (<family> or <family>-<precision>)
        │  Target.configure(recipe, flags)   target flags checked (one-line errors) and set on the recipe
        ▼
    trace → pipeline (passes) ─► Target.check_graph(model, recipe)    nothing left the runtime cannot run
        ▼
    staging dir: model.onnx, tokenizer, … + Target.manifest_fields(…) + Target.extra_graphs(…)
        │  Target.finish(staging, options)   post-build step (trt: AOT check, engine.plan), before the swap
        ▼
    artifact ─► runtime.engine_api.open_engine(artifact) ─► Target.engine  (a "module:Class" name the runtime imports)

A target is one module in this package defining ``TARGET``; the registry (``graphopt.targets``) finds them,
so adding a target is adding its module and its recipes. The runtime imports this layer, never the
reverse: a target names its engine by path instead of importing it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graphopt.core.errors import GraphoptError

if TYPE_CHECKING:
    import onnx_ir as ir

    from graphopt.core.manifest import Manifest
    from graphopt.passes.base import PipelineResults
    from graphopt.passes.pipeline import Recipe


class TargetError(GraphoptError):
    """An unknown target, or options and recipes that do not fit the target."""


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A target without options of its own."""


class Target:
    """The base every target derives from; the defaults describe a target that needs nothing special."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    engine: ClassVar[str]  # "graphopt.runtime.engine:OrtEngine": the class that runs this target's artifacts
    family: ClassVar[str | None] = None  # recipe names <family>[-<precision>]; None: the target's name
    options: ClassVar[type] = NoOptions  # the dataclass of the flags only this target accepts
    measures_fidelity: ClassVar[bool] = True  # the build can run the artifact here to compare it with fp32

    @property
    def recipe_family(self) -> str:
        return self.family or self.name

    def recipe_name(self, precision: str | None) -> str:
        """The built-in recipe for ``precision`` (None: full precision)."""
        return f"{self.recipe_family}-{precision}" if precision else self.recipe_family

    def configure(self, recipe: Recipe, flags: dict[str, Any]) -> tuple[Recipe, Any]:
        """Check ``recipe`` and the target flags the user set; return the recipe to run and the options."""
        if recipe.target != self.recipe_family:
            raise TargetError(f"recipe {recipe.name} is written for target {recipe.target!r}, not {self.name!r}; "
                              f"use a {self.recipe_family} recipe or --target {recipe.target}")
        return recipe, self.parse_options(flags)

    def parse_options(self, flags: dict[str, Any]) -> Any:
        """The options dataclass from the flags set; flags of other targets are refused by name."""
        fields = {f.name for f in dataclasses.fields(self.options)}
        foreign = {key: value for key, value in flags.items() if key not in fields}
        if foreign:
            from graphopt.targets import accepting, flag_name

            named = ", ".join(flag_name(key) for key in foreign)
            raise TargetError(f"{named} only apply to --target {' or '.join(accepting(next(iter(foreign))))}; "
                              "add --target or drop them")
        return self.options(**flags)

    def check_graph(self, model: ir.Model, recipe: Recipe) -> None:
        """After the pipeline: refuse a graph this target's runtime cannot run (one line, with the fix)."""

    def manifest_fields(self, model: ir.Model, manifest: Manifest, options: Any,
                        results: PipelineResults) -> dict[str, Any]:
        """Manifest fields the target sets (field name -> value, applied with dataclasses.replace), from the
        graph and what the passes handed on."""
        return {}

    def extra_graphs(self, staging: Path, model: ir.Model) -> dict[str, str]:
        """Graphs besides model.onnx the target writes into the artifact, by use (manifest ``graphs``)."""
        return {}

    def finish(self, staging: Path, options: Any, output: Path) -> list[str]:
        """The post-build step, run in ``staging`` before it goes live as ``output``; one line per step done."""
        return []
