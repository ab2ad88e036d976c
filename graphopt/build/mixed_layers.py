"""The candidates of ``--kl-budget`` (graphopt/build/mixed_precision.py): which layers a quantize pass would
round, their proxy errors, the ranked promotions, and the recipe that applies the top k of them.

A layer is named by :func:`graphopt.passes._quant_graph.layer_name` (``model.layers.3.mlp.down_proj``; the tied
embedding and lm_head, one tensor, is ``lm_head``). A promotion moves one layer one step up its ladder
(graphopt.quant.sensitivity.LADDERS); the top k promotions become the quantize pass's ``keep`` (float) and,
for int4, ``promote`` (int8 blocks) options, next to the layers the recipe pinned there itself.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from graphopt.passes._quant_graph import embedding_name, find_embedding, find_linears, layer_name, matches
from graphopt.passes.pipeline import PassSpec, Recipe
from graphopt.quant.sensitivity import LADDERS, Grid, ladder_errors

LOGITS = "lm_head"  # the layer whose output is the logits (tied or not)
BASES = {"quantize-int4": "int4", "quantize-int8": "int8", "quantize-fp8": "fp8"}


@dataclasses.dataclass(frozen=True)
class Step:
    """Promote ``layer`` from ``at`` to ``to``; ``gain`` = the proxy error that removes (what the ranking sorts by,
    per added bit when the layer sizes are known)."""
    layer: str
    to: str
    gain: float
    at: str = ""


def grid_of(spec: PassSpec, activation_block: int = 0) -> Grid:
    base = BASES[spec.name]
    block = int(spec.options.get("block_size", 32 if base == "int4" else 0))
    activations = spec.options.get("activations", True)
    return Grid(base, 0 if base == "fp8" else block, activations not in (False, "none"),
                bool(spec.options.get("full_range", False)), activation_block)


def kernel_activation_block(recipe: Recipe, index: int) -> int:
    """For an int4 quantize pass ``index``: its block size when a later ``lower-quant-ort-cpu`` runs MatMulNBits
    at accuracy_level ≥ 2 (the pass's default is 4), whose kernel rounds the input to int8 in blocks; else 0."""
    spec = recipe.passes[index]
    lower = next((s for s in recipe.passes[index + 1:] if s.name == "lower-quant-ort-cpu"), None)
    if BASES.get(spec.name) != "int4" or lower is None or int(lower.options.get("accuracy_level", 4)) < 2:
        return 0
    return grid_of(spec).block_size


def layer_errors(graph_or_model, stats, spec: PassSpec, activation_block: int = 0) -> dict[str, dict[str, float]]:
    """Proxy error at each step of its ladder for every layer ``spec`` would quantize and the recipe did not
    pin: ``keep`` layers are left out, int4 ``promote`` layers start at int8. ``activation_block``: see
    :func:`kernel_activation_block`."""
    graph = graph_or_model.graph if isinstance(graph_or_model, ir.Model) else graph_or_model
    grid, keep, pinned = grid_of(spec, activation_block), spec.options.get("keep"), spec.options.get("promote")
    errors = {}
    for name, x_name, w in _weights(graph, spec.options.get("embedding", True)):
        if matches(name, keep):
            continue
        start = "int8" if grid.base == "int4" and matches(name, pinned) else grid.base
        x = stats.get(x_name) if stats is not None and x_name else None
        errors[name] = ladder_errors(None if x is None else x.sample, w, grid, start,
                                     None if x is None else x.amax)
    return errors


def _weights(graph: ir.Graph, embedding: bool):
    """(layer name, input activation name or None, W [K, N]) for each linear and the embedding."""
    for lin in find_linears(graph):
        yield layer_name(lin.node), lin.node.inputs[0].name, lin.array
    table = find_embedding(graph) if embedding else None
    if table is not None:  # E [V, H] → as a MatMul weight [H, V] (the tied lm_head computes h Eᵀ)
        x_name = table.lm_head.inputs[0].name if table.lm_head is not None else None
        yield embedding_name(table), x_name, table.array.T


def layer_sizes(graph_or_model, spec: PassSpec, float_bits: int | None = None) -> dict[str, tuple[int, int]]:
    """(weights, bits of a float weight) of every layer ``spec`` may quantize: what a promotion costs.
    ``float_bits``: the width the target computes in (:func:`target_float_bits`); without it, the traced
    weight's own."""
    graph = graph_or_model.graph if isinstance(graph_or_model, ir.Model) else graph_or_model
    return {name: (int(w.size), float_bits or (8 * w.dtype.itemsize if w.dtype.kind == "f" else 32))
            for name, _, w in _weights(graph, spec.options.get("embedding", True))}


def target_float_bits(recipe: Recipe, index: int, target_options=None) -> int | None:
    """16 when the target lowers to float16/bfloat16 (TensorRT's ``--dtype``, or the lowering pass's ``dtype``
    after the quantize pass ``index``), 32 for float32, None when nothing says (the traced dtype stands)."""
    dtype = getattr(target_options, "dtype", None) or next(
        (spec.options["dtype"] for spec in recipe.passes[index + 1:]
         if spec.name.startswith("lower-") and "dtype" in spec.options), None)
    return None if dtype is None else 16 if dtype in ("float16", "bfloat16") else 32


BITS = {"int4": 4, "int8": 8, "fp8": 8}  # per weight; "float" is the layer's own float width (layer_sizes)


def step_bits(size: tuple[int, int], at: str, to: str) -> int:
    """The bits a promotion adds to the artifact (block scales are left out: int4 → int8 keeps the blocks)."""
    weights, float_bits = size
    return weights * ((float_bits if to == "float" else BITS[to]) - (float_bits if at == "float" else BITS[at]))


def rank_steps(errors: dict[str, dict[str, float]], sizes: dict[str, tuple[int, int]] | None = None) -> list[Step]:
    """Every layer's steps up its ladder, the most error removed per added bit first (``sizes`` given; without
    it, the most error removed), stable for ties — except that the ``lm_head``'s first step comes first: its
    output error is the logits' error, undamped by the layers above, so its relative error is not comparable
    with an inner MatMul's (measured: on SmolLM2 int4, the search ranking by error alone needed more than 199
    of 422 promotions; the tiny test model's lm_head step, ranked 15th of 30 by error, took the KL from 5e-4
    to 8e-6 on its own).

    Why per bit: ranked by error alone, SmolLM2's ``--int4 --kl-budget 0.05`` spent its bytes on fp32
    promotions (chose 90 layers → int8 and 52 → fp32, among them the 28 M-weight tied lm_head: 297 MiB against
    the plain build's 88 MiB), yet an int8 → fp32 step costs 6× an int4 → int8 step of the same layer."""
    steps = [Step(layer, to, errs[at] - errs[to], at)
             for layer, errs in errors.items() for at, to in zip(errs, list(errs)[1:])]
    if sizes is None:
        return sorted(steps, key=lambda s: (s.layer != LOGITS, -s.gain))
    starts = ladder_bottoms(steps)
    return sorted(steps, key=lambda s: (not (s.layer == LOGITS and s.at == starts[s.layer]),
                                        -s.gain / max(step_bits(sizes[s.layer], s.at, s.to), 1)))


def ladder_bottoms(steps: list[Step]) -> dict[str, str]:
    """Layer → the precision its ladder starts from: the one step of the layer that no other step reaches."""
    reached = {(step.layer, step.to) for step in steps}
    return {step.layer: step.at for step in steps if (step.layer, step.at) not in reached}


def assignment(steps: list[Step], k: int) -> dict[str, str]:
    """Layer → precision after the top ``k`` promotions (the highest step reached; unpromoted layers absent)."""
    chosen: dict[str, str] = {}
    order = LADDERS["int4"]  # int8 below float on every ladder
    for step in steps[:k]:
        if step.layer not in chosen or order.index(step.to) > order.index(chosen[step.layer]):
            chosen[step.layer] = step.to
    return chosen


def recipe_for(recipe: Recipe, index: int, chosen: dict[str, str]) -> Recipe:
    """``recipe`` with pass ``index`` keeping the ``float`` layers and (int4) promoting the ``int8`` ones."""
    spec = recipe.passes[index]
    keep = list(spec.options.get("keep") or ()) + sorted(n for n, p in chosen.items() if p == "float")
    promote = list(spec.options.get("promote") or ()) + sorted(n for n, p in chosen.items() if p == "int8")
    options = dict(spec.options) | ({"keep": keep} if keep else {}) | ({"promote": promote} if promote else {})
    passes = list(recipe.passes)
    passes[index] = PassSpec(spec.name, options)
    return dataclasses.replace(recipe, passes=tuple(passes))
