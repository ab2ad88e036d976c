"""``graphopt build --target trt`` options → the recipe's ``lower-trt`` options, checked before any loading.

    --attention standard|plugin   FlashAttention as TensorScatter + Attention, or the plugin node (+ function)
    --dtype float16|bfloat16      compute and cache dtype (float32: TensorRT has no fused fp32 attention)
    --trt-max-seq T               static KV-cache capacity (0 = the model's context, at most 4096)
    --trt-max-batch N             optimization profiles: rows per call (both profiles)
    --trt-max-prefill N           optimization profiles: tokens per prefill call
    --aot-check sm89,sm120        after writing, parse and AOT-build with TensorRT-RTX for those archs
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from graphopt.core.errors import GraphoptError

if TYPE_CHECKING:  # imported by the target registry, which the runtime loads: no passes at import
    from graphopt.passes.pipeline import Recipe


class TrtOptionError(GraphoptError):
    """A --target trt option that cannot work."""


def _flag(name: str, default):
    return dataclasses.field(default=default, metadata={"flag": name})


@dataclasses.dataclass(frozen=True)
class TrtOptions:
    attention: str = _flag("--attention", "standard")
    dtype: str = _flag("--dtype", "float16")
    max_seq: int = _flag("--trt-max-seq", 0)
    max_batch: int = _flag("--trt-max-batch", 8)
    max_prefill: int = _flag("--trt-max-prefill", 512)
    aot_check: str | None = _flag("--aot-check", None)


def check_trt_options(options: TrtOptions) -> None:
    """One-line errors for trt options that cannot work."""
    if options.dtype == "float32":
        raise TrtOptionError("--target trt with float32 attention: TensorRT has no fused fp32 attention kernel; "
                             "use --dtype float16 (default) or bfloat16")


def check_no_kv_quant(recipe: Recipe) -> None:
    spec = next((s for s in recipe.passes if s.name == "quantize-kv-cache"), None)
    if spec is not None:
        raise TrtOptionError(f"--kv-cache {spec.options.get('dtype', 'fp8')} is not supported with --target trt yet; "
                             "drop it (the trt cache is in the compute dtype)")


def apply_trt_options(recipe: Recipe, options: TrtOptions) -> Recipe:
    """The recipe with every ``lower-trt`` pass set to ``options``; an error if it has none."""
    from graphopt.passes.pipeline import PassSpec

    if not any(spec.name == "lower-trt" for spec in recipe.passes):
        raise TrtOptionError(f"recipe {recipe.name} targets trt but has no 'lower-trt' pass; add one before "
                             "'check-trt'")
    values = {"attention": options.attention, "dtype": options.dtype, "max_seq": options.max_seq,
              "max_batch": options.max_batch, "max_prefill": options.max_prefill}
    passes = tuple(PassSpec(s.name, {**s.options, **values}) if s.name == "lower-trt" else s for s in recipe.passes)
    suffix = "" if options.attention == "standard" else f"+{options.attention}"
    return dataclasses.replace(recipe, name=recipe.name + suffix, passes=passes)
