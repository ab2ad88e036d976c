"""``graphopt build --int4|--int8|--fp8 --kl-budget X``: promote the most sensitive quantized MatMuls to the next
precision until the evaluation KL against the fp32 model is within X.

    ladders      int4 → int8 (blocks of the same size) → float;  int8 → float;  fp8 → float
                 ("float" is the target's compute type: fp32 on ort-cpu, fp16 with --target trt --dtype float16)
    1. prefix    load, trace, and run the recipe up to its quantize pass once (calibration included)
    2. proxy     each quantized MatMul's relative output error on the calibration sample at every step of
                 its ladder (graphopt.quant.sensitivity; numpy, seconds) — the tied embedding is ``lm_head``
    3. rank      one "promotion" = one layer one step up; sorted by the proxy error it removes per bit it adds
                 (an int8 → fp32 step of a layer costs 6× its int4 → int8 step; the lm_head's first step first)
    4. search    the smallest k (within 1/8) such that the top k promotions bring the KL within X. A probe
                 clones the prefix graph, runs the rest of the recipe with the quantize pass's ``keep`` /
                 ``promote`` options, and measures KL on the build's evaluation text against the same fp32
                 reference the build report uses, through graph_logits (the path ``compare --bisect`` uses)
    5. build     the chosen recipe, written atomically (graphopt/build/staging.py) with a
                 ``mixed_precision`` section in its report; when the written artifact's KL is over X it is
                 not swapped into place (exit 1)

Cost in evaluations: E probes + the final build. k = 0 (the plain build) and k = n (everything promoted; when
that misses, exit 1 with the best KL and nothing written) come first, then a geometric bisection:
about 2 + ⌈log2(ln n / ln(9/8))⌉, plus up to ⌈log2(n/8)⌉ when the answer lies within n/8 of n — 8 measured
for SmolLM2 int4 (n = 422 promotions). A probe costs the quantize pass (AWQ's search for int4), the lowering
and one evaluation; the trace and calibration run once for the search and once more in the final build.

Layers pinned in the recipe stay where they are pinned and are not candidates: the quantize pass's ``keep``
(fp32) and, for int4, ``promote`` (int8) — names or shell patterns, ``keep = ["lm_head", "model.layers.0.*"]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from graphopt.build.mixed_layers import (BASES, Step, assignment, kernel_activation_block, ladder_bottoms, layer_errors,
                                         layer_sizes, rank_steps, recipe_for, step_bits, target_float_bits)
from graphopt.build.precision import PrecisionError
from graphopt.core.errors import GraphoptError
from graphopt.core.progress import Progress
from graphopt.measure.fidelity import EVAL_SEQ, evaluate, graph_logits, torch_logits
from graphopt.passes.base import PipelineResults
from graphopt.passes.pipeline import Recipe, run_pipeline
from graphopt.quant.text import default_corpus, read_text_file, token_stream

QUANTIZE_PASSES = BASES  # quantize pass → the precision its ladder starts from
TOLERANCE = 8  # the search stops when the chosen k is within 1/TOLERANCE of the smallest that works


class BudgetError(GraphoptError):
    """A --kl-budget that even every promotion cannot meet (exit 1, nothing written)."""

    exit_code = 1


def check_budget(recipe: Recipe, budget: float) -> None:
    """One-line errors (exit 2) before anything is loaded: a recipe with no quantize pass, a budget ≤ 0."""
    if not any(spec.name in QUANTIZE_PASSES for spec in recipe.passes):
        raise PrecisionError("--kl-budget needs a quantized build: add --int4, --int8 or --fp8 (or a --recipe "
                             "with a quantize-int4/-int8/-fp8 pass)")
    if not math.isfinite(budget) or budget <= 0:
        raise PrecisionError(f"--kl-budget {budget} must be a positive KL in nats (a plain quantized build reports "
                             "its KL; e.g. --kl-budget 0.05)")
    quantize_index(recipe)


@dataclasses.dataclass
class Search:
    chosen: int
    kl: float
    met: bool
    probes: dict[int, float]


def search_promotions(kl_at: Callable[[int], float], n: int, budget: float) -> Search:
    """The smallest k in [0, n] (within 1/TOLERANCE, exactly when it is near n) with ``kl_at(k) <= budget``,
    assuming KL falls as k grows. (SmolLM2 fp8 at 0.01 measured 0.0108 at k = 194 of 211: a 1/8 tolerance there
    stopped at k = n, every layer float.)"""
    probes: dict[int, float] = {}

    def probe(k: int) -> float:
        probes[k] = kl_at(k)
        return probes[k]

    if probe(0) <= budget:
        return Search(0, probes[0], True, probes)
    if n == 0 or probe(n) > budget:
        best = min(probes, key=probes.get)
        return Search(best, probes[best], False, probes)
    lo, hi = 0, n
    while hi - lo > (1 if hi == n else max(1, hi // TOLERANCE)):  # "promote everything" is no answer
        mid = min(max(round(math.sqrt(max(lo, 1) * hi)), lo + 1), hi - 1)
        lo, hi = (lo, mid) if probe(mid) <= budget else (mid, hi)
    return Search(hi, probes[hi], True, probes)


class Prober:
    """The recipe's prefix run once; ``kl(recipe)`` runs the rest of a recipe on a copy and measures its KL."""

    def __init__(self, loaded, options, context, progress: Progress, index: int, measures_fidelity: bool) -> None:
        from graphopt.build.artifact import clone_model

        self.loaded, self.context, self.progress, self.index = loaded, context, progress, index
        self.cut = measures_fidelity
        self.prefix, self.results = clone_model(loaded.model), PipelineResults()
        prefix = dataclasses.replace(options.recipe, passes=options.recipe.passes[:index])
        with progress.step(f"running {options.recipe.name} up to {options.recipe.passes[index].name} once"):
            run_pipeline(self.prefix, prefix, context=context, results=self.results)
        corpus = read_text_file(options.eval_text, "eval_text") if options.eval_text else \
            default_corpus("evaluation")
        self.ids, self.text = token_stream(loaded.tokenizer, corpus, options.eval_tokens, "eval_tokens"), corpus.source
        self.reference = _memo(torch_logits(loaded.torch_model))

    def kl(self, recipe: Recipe, label: str) -> float:
        from graphopt.build.artifact import clone_model

        passes = recipe.passes[self.index:]
        if not self.cut:  # the target's lowered graph runs on other hardware: measure the Q/DQ graph
            passes = passes[:next((i for i, s in enumerate(passes) if s.name.startswith(("lower-", "check-"))),
                                  len(passes))]
        model = clone_model(self.prefix)
        with self.progress.step(f"{label}: quantizing and lowering"):
            results = PipelineResults(calibration=self.results.calibration, precision=dict(self.results.precision))
            run_pipeline(model, dataclasses.replace(recipe, passes=passes), context=self.context, results=results)
        with self.progress.bar(f"{label}: KL on {self.ids.size} tokens", total=-(-self.ids.size // EVAL_SEQ)) as adv:
            kl = evaluate(graph_logits(model), self.reference, self.ids, self.text, advance=adv).kl_mean
        if self.progress.enabled:
            self.progress.console.print(f"  {label}: KL {kl:.4f}")
        return kl


def _memo(logits: Callable) -> Callable:
    """The fp32 reference runs once per evaluation row, however many probes read it."""
    cache: dict[bytes, Any] = {}

    def run(row):
        key = row.tobytes()
        if key not in cache:
            cache[key] = logits(row)
        return cache[key]

    return run


def quantize_index(recipe: Recipe) -> int:
    found = [i for i, spec in enumerate(recipe.passes) if spec.name in QUANTIZE_PASSES]
    if len(found) != 1:
        raise PrecisionError(f"--kl-budget: recipe {recipe.name} has {len(found)} weight-quantize passes; it needs "
                             "exactly one of quantize-int4, quantize-int8, quantize-fp8")
    return found[0]


def build_within_budget(spec: str, options, progress: Progress, on_pass: Callable | None = None, *,
                        budget: float) -> dict[str, Any]:
    """Search the promotions (module docstring), then build the chosen recipe into ``options.output``."""
    from graphopt.build.artifact import build_traced

    loaded, context, index, measures = _load(spec, options, progress)
    prober = Prober(loaded, options, context, progress, index, measures)
    with progress.step("ranking quantized MatMuls by their output error per added bit on the calibration sample"):
        spec = options.recipe.passes[index]
        sizes = layer_sizes(prober.prefix, spec, target_float_bits(options.recipe, index, options.target_options))
        block = kernel_activation_block(options.recipe, index)
        steps = rank_steps(layer_errors(prober.prefix, prober.results.calibration, spec, block), sizes)

    def recipe(k: int) -> Recipe:
        return recipe_for(options.recipe, index, assignment(steps, k))

    search = search_promotions(lambda k: prober.kl(recipe(k), f"top {k}/{len(steps)} promotions"), len(steps),
                               budget)
    if not search.met:
        raise BudgetError(f"--kl-budget {budget}: not met even with every quantized MatMul promoted; the best KL "
                          f"reached is {search.kl:.3g} (top {search.chosen} of {len(steps)} promotions); nothing was "
                          "written — raise the budget or drop other lossy options (--kv-cache)")
    section = summary(budget, steps, search, QUANTIZE_PASSES[options.recipe.passes[index].name], sizes, block)

    def finalize(report: dict[str, Any]) -> None:
        report["mixed_precision"] = section
        measured = (report.get("fidelity") or {}).get("kl_mean")
        if measured is not None and measured > budget:
            raise BudgetError(f"--kl-budget {budget}: the written artifact measured KL {measured:.4f} (the search's "
                              f"graph {search.kl:.4f}); nothing was written — rerun, or lower the budget a little")

    chosen = dataclasses.replace(options, recipe=recipe(search.chosen), kl_budget=budget)
    return build_traced(loaded, chosen, progress, context, on_pass, finalize=finalize)


def _load(spec: str, options, progress: Progress):
    """What ``build`` does before its pipeline: the destination check, calibration text, load, trace."""
    from graphopt.build import quant as quant_build
    from graphopt.build.artifact import load, trace_loaded
    from graphopt.build.staging import check_destination
    from graphopt.targets import get_target

    check_destination(options.output, options.force)
    index = quantize_index(options.recipe)
    corpus = quant_build.calibration_corpus(options.recipe, options.calib_text)
    loaded = load(spec, options.attn_implementation, progress)
    context = quant_build.pass_context(options, corpus, loaded.torch_model.config, loaded.tokenizer, progress)
    trace_loaded(loaded, progress, options.experts)
    return loaded, context, index, get_target(options.target_name).measures_fidelity


def summary(budget: float, steps: list[Step], search: Search, base: str,
            sizes: dict[str, tuple[int, int]], activation_block: int = 0) -> dict[str, Any]:
    """The report's ``mixed_precision``: what was promoted, the probes, the proxy that ranked them, and the
    weight bytes the promotions added (block scales left out)."""
    chosen = assignment(steps, search.chosen)
    start = ladder_bottoms(steps)
    layers = {precision: sorted(name for name, p in chosen.items() if p == precision)
              for precision in ("int8", "float") if any(p == precision for p in chosen.values())}
    return {"kl_budget": budget, "base": base, "kl_plain": search.probes[0], "kl_search": search.kl,
            "promotions": search.chosen, "candidates": len(steps), "layers_promoted": len(chosen),
            "layers": len({step.layer for step in steps}),
            "promoted": layers,
            "added_weight_bytes": sum(step_bits(sizes[name], start[name], p) for name, p in chosen.items()) // 8,
            "probes": [{"promotions": k, "kl": kl} for k, kl in sorted(search.probes.items())],
            "proxy": "relative output error on the calibration sample, RTN (graphopt.quant.sensitivity)" + (
                f"; input rounded to int8 in blocks of {activation_block}, as MatMulNBits' int8 kernel does"
                if activation_block else ""),
            "ranking": "proxy error removed per bit added (the lm_head's first step first)"}
