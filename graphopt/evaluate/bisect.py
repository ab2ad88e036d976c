"""graphopt compare --bisect: which pass of a recipe spent the fidelity budget.

The recipe runs once on the trace, and after every pass the graph *as it stands* — the pipeline cut after
that pass — is evaluated against the fp32 PyTorch model on the evaluation text. Passes are deterministic
functions of the graph and the build context, so this gives the same graphs as rebuilding with the
recipe truncated after each pass, in one pipeline run instead of N.

How a cut is run. A cut taken mid-pipeline is generally not an artifact OrtEngine can load: before
'insert-kv-cache' there is no cache contract, before 'lower-ort-cpu' the graph holds
``graphopt::FlashAttention``, before 'lower-quant-ort-cpu' weights are Q/DQ pairs. So every cut, the last
one included, goes through the one path that runs all of them — the path ``--verify`` and 'calibrate'
use: serialize, expand FlashAttention into its standard-op reference (plugins/flash_attention.py), and run
on ONNX Runtime CPU with one row per call, an empty cache of exactly the row's length, and the logits of
every position requested. Q/DQ weights run with ``qdq_matmulnbits_accuracy_level = 0`` (the exact meaning
of the quantized weights), so a quantize pass is charged for its rounding and the lowering pass that picks
``accuracy_level = 4`` (int8 activations inside MatMulNBits) is charged for that. The last cut is the
artifact's graph, so its KL agrees with what ``graphopt compare`` measures on OrtEngine (SmolLM2 int4:
0.556 here, 0.559 there — separate builds, whose multi-threaded calibration is not bit-reproducible).

Budget: ``--kl-budget``, else the recipe's ``[gate] kl_budget``, else the build's budget for the weight
precision the recipe quantizes to (graphopt.build.quant.BUDGETS), else ``kl_abs`` (a lossless recipe). The
culprit is the first pass after which the KL exceeds the budget; none when the final KL is within it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


from graphopt.quant.text import token_stream
from graphopt.evaluate.compare import CompareOptions, plan, prepare
from graphopt.evaluate.compare_measure import ReferenceLogits, measure_fidelity
from graphopt.measure.fidelity import graph_logits
from graphopt.passes.pipeline import Recipe, run_pipeline
from graphopt.core.progress import Progress

QUANTIZE_BUDGETS = {"quantize-int4": "int4", "quantize-int8": "int8", "quantize-fp8": "fp8"}


def kl_budget(recipe: Recipe, configured: float | None, lossless: float) -> tuple[float, str]:
    """The KL budget and where it came from."""
    from graphopt.build.quant import BUDGETS

    if configured is not None:
        return configured, "--kl-budget / [gate] kl_budget"
    for spec in recipe.passes:
        if spec.name in QUANTIZE_BUDGETS:
            kind = QUANTIZE_BUDGETS[spec.name]
            return BUDGETS[kind][0], f"the {kind} build budget"
    return lossless, "kl_abs (no quantize pass: lossless)"


@dataclasses.dataclass
class Stage:
    index: int
    name: str
    modified: bool
    lossy: bool
    fidelity: dict[str, Any]
    kl_spent: float = 0.0


def run_bisect(options: CompareOptions, overrides: dict[str, float | None], progress: Progress) -> dict[str, Any]:
    """Run the single recipe of ``options`` once, evaluating the graph after every pass."""
    chosen = plan(options, overrides)
    (recipe,), limit = chosen.recipes, chosen.limits[chosen.recipes[0].name]
    budget, budget_source = kl_budget(recipe, limit.kl_budget, limit.kl_abs)
    loaded, (context,) = prepare(options, [recipe], progress)
    ids = token_stream(loaded.tokenizer, chosen.eval_corpus, options.eval_tokens, "--eval-tokens")
    reference, text = ReferenceLogits(loaded.torch_model), chosen.eval_corpus.source
    model = loaded.model
    stages = [Stage(0, "(trace)", False, False,
                    measure_fidelity(graph_logits(model), reference, ids, text, progress, "traced graph"))]

    def after(record) -> None:
        label = f"after {len(stages)}: {record.name}"
        fidelity = measure_fidelity(graph_logits(model), reference, ids, text, progress, label)
        stages.append(Stage(len(stages), record.name, record.modified, record.lossy, fidelity,
                            fidelity["kl_mean"] - stages[-1].fidelity["kl_mean"]))

    run_pipeline(model, recipe, on_pass=after, context=context)
    return verdict(recipe, stages, budget, budget_source, loaded.source, int(ids.size))


def verdict(recipe: Recipe, stages: list[Stage], budget: float, budget_source: str, source,
            tokens: int) -> dict[str, Any]:
    final = stages[-1].fidelity["kl_mean"]
    culprit = next((s for s in stages if s.fidelity["kl_mean"] > budget), None) if final > budget else None
    costliest = max(stages[1:], key=lambda s: s.kl_spent)
    return {"format": "graphopt-bisect", "model": source.model_id, "recipe": recipe.name, "source": recipe.source,
            "eval_tokens": tokens, "kl_budget": budget, "budget_source": budget_source, "final_kl": final,
            "within_budget": culprit is None,
            "culprit": None if culprit is None else {"index": culprit.index, "pass": culprit.name},
            "costliest": {"index": costliest.index, "pass": costliest.name, "kl_spent": costliest.kl_spent},
            "stages": [dataclasses.asdict(s) for s in stages]}
