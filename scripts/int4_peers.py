"""Fidelity of int4 builds against fp32 and against ONNX Runtime's own int4, from one trace (the table in
passes/quantize_int4.py). Each recipe is built as ``graphopt compare`` builds it (KL / top-1 / perplexity vs the
fp32 PyTorch model on the built-in corpus's evaluation split); each --genai folder (a GenAI builder model, e.g.
~/.cache/graphopt/genai/<sha>-int4-b32-a4-og<version>) is run through graphopt.measure.genai_peer.genai_logits.

    .venv/bin/python scripts/int4_peers.py OUT [--model smollm2-135m] RECIPE... [--genai DIR]...

One JSON line per build on stdout, all of them in OUT/rows.json. Speed is not measured (use graphopt compare).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from graphopt.build.artifact import build_traced
from graphopt.core.progress import Progress
from graphopt.evaluate.compare import CompareOptions, build_options, prepare
from graphopt.evaluate.compare_measure import ReferenceLogits
from graphopt.measure.fidelity import evaluate
from graphopt.measure.genai_peer import genai_logits
from graphopt.passes.pipeline import load_recipe
from graphopt.quant.text import EVAL_TOKENS, default_corpus, token_stream


def row(name: str, fidelity: dict, size: int, seconds: float, weights: str) -> dict:
    return {"build": name, "kl": fidelity["kl_mean"], "top1": fidelity["top1_agreement"], "kl_p99": fidelity["kl_p99"],
            "ppl": fidelity["ppl_candidate"], "ppl_ref": fidelity["ppl_reference"], "tokens": fidelity["tokens"],
            "bytes": size, "weights": weights, "s": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("recipes", nargs="*")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--genai", type=Path, action="append", default=[])
    args = parser.parse_args()
    progress = Progress(enabled=False)
    options = CompareOptions(tuple(args.recipes), args.model, args.out, peers=())
    recipes = [load_recipe(spec) for spec in args.recipes]
    corpus = default_corpus("evaluation")
    loaded, contexts = prepare(options, recipes, progress)
    ids = token_stream(loaded.tokenizer, corpus, EVAL_TOKENS, "eval")
    reference = ReferenceLogits(loaded.torch_model)
    rows = []
    for folder in args.genai:
        start = time.time()
        fidelity = evaluate(genai_logits(folder), reference, ids, corpus.source).to_json()
        size = sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))
        rows.append(row(f"genai {folder.name}", fidelity, size, time.time() - start, "genai int4"))
        print(json.dumps(rows[-1]), flush=True)
    for recipe, context in zip(recipes, contexts):
        start = time.time()
        report = build_traced(loaded, build_options(recipe, options), progress, context, copy=True)
        rows.append(row(recipe.name, report["fidelity"], report["artifact_bytes"], time.time() - start,
                        report["precision"]["weights"]))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
