"""Peer rows of ``graphopt compare``: int4 as ONNX Runtime's own tools make it, beside graphopt's int4 recipes.

When a compare run has an int4 recipe (one with a 'quantize-int4' pass), two peers are measured on the same
trace, the same evaluation rows and the same fp32 reference, at that recipe's block size and accuracy_level::

    int4 recipe (AWQ, blocks of b, accuracy_level A)                 ─► recipe rows (timed, gated)
    ort-rtn     recipe ort-cpu-int4-ort-rtn: ONNX Runtime's           ─► peer row: KL, top-1, ppl, size
                MatMulNBitsQuantizer RTN on graphopt's graph (b, A)
    genai-int4  onnxruntime_genai.models.builder -p int4 -e cpu        ─► peer row: KL, top-1, ppl, size
                (block_size=b, accuracy_level=A; its own model, cached; run by ORT, graphopt.measure.genai_peer)

Peers are not timed and never gated (``compare.json`` keeps them under ``peers``, not ``recipes``): they say
whether graphopt's int4 is at least as faithful as what a user gets from ONNX Runtime directly. List
ort-cpu-int4-ort-rtn as a recipe to time and gate it like any other. ``--peers none`` turns them off; a peer
that cannot be built here (no onnxruntime-genai) is a row with ``skipped`` and the reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError, RecipeError
from graphopt.core.progress import Progress
from graphopt.passes.pipeline import PassSpec, Recipe, load_recipe

PEERS = ("ort-rtn", "genai")
ORT_RTN_RECIPE = "ort-cpu-int4-ort-rtn"
FIDELITY_KEYS = ("tokens", "kl_mean", "kl_p99", "top1_agreement", "ppl_reference", "ppl_candidate")


def parse_peers(text: str) -> tuple[str, ...]:
    """``--peers``: "ort-rtn,genai" (default), a subset, or "none"."""
    if text.strip() in ("", "none"):
        return ()
    chosen = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PEERS]
    if unknown:
        raise RecipeError(f"--peers {text!r}: unknown peer(s) {unknown}; use a comma list of {list(PEERS)} or 'none'")
    return chosen


def int4_settings(recipes: list[Recipe]) -> tuple[int, int] | None:
    """(block size, accuracy_level) of the first int4 recipe (a 'quantize-int4' pass), else None."""
    for recipe in recipes:
        quantize = next((s for s in recipe.passes if s.name == "quantize-int4"), None)
        if quantize is not None:
            lower = next((s for s in recipe.passes if s.name == "lower-quant-ort-cpu"), None)
            level = (lower.options.get("accuracy_level", 4) if lower else 4) or 1  # 0 means fp32 compute: level 1
            return int(quantize.options.get("block_size", 32)), int(level)
    return None


def ort_rtn_recipe(block_size: int, accuracy_level: int) -> Recipe:
    """The built-in ort-cpu-int4-ort-rtn recipe at the int4 recipe's block size and accuracy_level."""
    recipe = load_recipe(ORT_RTN_RECIPE)
    passes = tuple(PassSpec(s.name, s.options | {"block_size": block_size, "accuracy_level": accuracy_level})
                   if s.name == "quantize-int4-ort" else s for s in recipe.passes)
    return dataclasses.replace(recipe, passes=passes)


def measure_peers(loaded: Any, options: Any, recipes: list[Recipe], reference: Any, ids: np.ndarray, text: str,
                  progress: Progress) -> list[dict[str, Any]]:
    """The peer rows of a compare run (empty without an int4 recipe or with ``options.peers`` empty)."""
    settings = int4_settings(recipes)
    if settings is None or not options.peers:
        return []
    block, level = settings
    rows = []
    if "ort-rtn" in options.peers and ORT_RTN_RECIPE not in {r.name for r in recipes}:
        rows.append(_ort_rtn(loaded, options, ort_rtn_recipe(block, level), progress))
    if "genai" in options.peers:
        rows.append(_genai(loaded, block, level, reference, ids, text, progress))
    return rows


def _ort_rtn(loaded: Any, options: Any, recipe: Recipe, progress: Progress) -> dict[str, Any]:
    from graphopt.build import quant as quant_build
    from graphopt.build.artifact import BuildOptions, build_traced

    built = BuildOptions(recipe, options.out / "artifacts" / "peers" / recipe.name, force=True,
                         attn_implementation=options.attn_implementation, eval_tokens=options.eval_tokens,
                         eval_text=options.eval_text)
    report = build_traced(loaded, built, progress, quant_build.context_for(built, loaded, progress), copy=True)
    return {"peer": "ort-rtn", "name": recipe.name, "how": recipe.description, "artifact": str(built.output),
            "precision": report["precision"], "fidelity": {k: report["fidelity"][k] for k in FIDELITY_KEYS},
            "artifact_bytes": report["artifact_bytes"]}


def _genai(loaded: Any, block: int, level: int, reference: Any, ids: np.ndarray, text: str,
           progress: Progress) -> dict[str, Any]:
    from graphopt.evaluate.compare_measure import measure_fidelity
    from graphopt.measure.genai_peer import PeerPrecision, genai_logits, genai_model

    peer = PeerPrecision("int4", block, level)
    row: dict[str, Any] = {"peer": "genai", "name": "genai-int4",
                           "how": f"onnxruntime_genai.models.builder {' '.join(peer.builder_args())}"}
    try:
        model_dir = genai_model(loaded.source, progress, peer)
    except GraphoptError as exc:
        return row | {"skipped": str(exc)}
    fidelity = measure_fidelity(genai_logits(model_dir), reference, ids, text, progress, "genai-int4")
    size = sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.name.startswith("model.onnx"))
    return row | {"artifact": str(model_dir), "precision": {"weights": f"int4 block {block} symmetric (genai rtn)"},
                  "fidelity": {k: fidelity[k] for k in FIDELITY_KEYS}, "artifact_bytes": size}
