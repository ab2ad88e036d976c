"""Precision flags of ``graphopt build`` → a recipe: ``--int4 [--int4-block N] | --int8 | --fp8 | --keep-quant
[--kv-cache D]``.

Each precision is a readable recipe in ``models/`` (``ort-cpu-int4.toml`` …); the flags only pick
it and set the options they name, so ``--int4 --int4-block 64`` is ``models/ort-cpu-int4.toml``
with ``quantize-int4.block_size = 64``, and ``--kv-cache fp8`` inserts ``quantize-kv-cache``
(and a ``calibrate`` pass if the recipe has none) before the first lowering pass.
"""

from __future__ import annotations

import dataclasses

from graphopt.core.errors import GraphoptError
from graphopt.passes.pipeline import PassSpec, Recipe, load_recipe
from graphopt.targets import Target, get_target

INT4_BLOCKS = (32, 64, 128)
KV_DTYPES = ("fp8", "int8")


class PrecisionError(GraphoptError):
    """Conflicting or malformed precision flags."""


@dataclasses.dataclass(frozen=True)
class PrecisionFlags:
    int4: bool = False
    int4_block: int | None = None
    int8: bool = False
    fp8: bool = False
    kv_cache: str | None = None
    keep_quant: bool = False  # a pre-quantized GGUF's own blocks (recipe <family>-keep-quant)

    @property
    def weights(self) -> str | None:
        if self.keep_quant:
            return "keep-quant"
        return "int4" if self.int4 else "int8" if self.int8 else "fp8" if self.fp8 else None


def check_flags(flags: PrecisionFlags, recipe: str | None) -> None:
    """One-line errors for flags that cannot go together; called before any model is loaded."""
    chosen = [name for name, on in (("--int4", flags.int4), ("--int8", flags.int8), ("--fp8", flags.fp8),
                                    ("--keep-quant", flags.keep_quant)) if on]
    if len(chosen) > 1:
        raise PrecisionError(f"{' and '.join(chosen)} cannot be combined: weights have one precision; "
                             "pick one of --int4, --int8, --fp8, --keep-quant")
    if flags.int4_block is not None and not flags.int4:
        raise PrecisionError(f"--int4-block {flags.int4_block} only applies to --int4; add --int4 or drop it")
    if flags.int4_block is not None and flags.int4_block not in INT4_BLOCKS:
        raise PrecisionError(f"--int4-block {flags.int4_block} is not supported; use 32, 64 or 128")
    if flags.kv_cache is not None and flags.kv_cache not in KV_DTYPES:
        raise PrecisionError(f"--kv-cache {flags.kv_cache} is not supported; use fp8 or int8")
    if chosen and recipe is not None:
        raise PrecisionError(f"{chosen[0]} selects the recipe 'ort-cpu-{flags.weights}'; drop --recipe, or put "
                             "the quantize passes in your own recipe and drop the flag")


def build_target(name: str | None, recipe: str | None) -> Target:
    """``--target``; without it the recipe's own target (``--recipe``), else ort-cpu."""
    return get_target(name or (load_recipe(recipe).target if recipe else "ort-cpu"))


def precision_recipe(flags: PrecisionFlags, recipe: str | None, target: Target | str) -> Recipe:
    """The recipe the flags ask for: ``--recipe`` or the target's (``<family>-<precision>``), adjusted."""
    check_flags(flags, recipe)
    target = get_target(target) if isinstance(target, str) else target
    base = load_recipe(recipe or target.recipe_name(flags.weights))
    passes = list(base.passes)
    if flags.int4_block is not None:
        passes = [_with_option(spec, "quantize-int4", block_size=flags.int4_block) for spec in passes]
    if flags.kv_cache is not None:
        passes = _insert_kv_cache(passes, flags.kv_cache)
    name = base.name + (f"+kv-{flags.kv_cache}" if flags.kv_cache else "")
    return dataclasses.replace(base, name=name, passes=tuple(passes))


def _with_option(spec: PassSpec, name: str, **options) -> PassSpec:
    return PassSpec(spec.name, {**spec.options, **options}) if spec.name == name else spec


def _insert_kv_cache(passes: list[PassSpec], dtype: str) -> list[PassSpec]:
    names = [spec.name for spec in passes]
    if "insert-kv-cache" not in names:
        raise PrecisionError("--kv-cache needs a recipe with 'insert-kv-cache'; use a built-in recipe")
    if "quantize-kv-cache" in names:
        return [_with_option(spec, "quantize-kv-cache", dtype=dtype) for spec in passes]
    lowering = next((i for i, n in enumerate(names) if n.startswith("lower-")), len(passes))
    added = [PassSpec("quantize-kv-cache", {"dtype": dtype})]
    if "calibrate" not in names[:lowering]:
        added.insert(0, PassSpec("calibrate", {}))
    return passes[:lowering] + added + passes[lowering:]


def check_block_divides(block: int | None, config) -> None:
    """Fail fast, before tracing, when an int4 block cannot tile the model's input dimensions."""
    if block is None:
        return
    dims = {"hidden_size": getattr(config, "hidden_size", None),
            "intermediate_size": getattr(config, "intermediate_size", None)}
    for field, dim in dims.items():
        if isinstance(dim, int) and dim % block:
            fits = [b for b in INT4_BLOCKS if all(not isinstance(d, int) or d % b == 0 for d in dims.values())]
            hint = f"use --int4-block {' or '.join(map(str, fits))}" if fits else "use --int8 for this model"
            raise PrecisionError(f"--int4-block {block} does not divide the model's {field} {dim}; {hint}")
