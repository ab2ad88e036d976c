"""The quantization steps of ``graphopt build``: calibration input, early checks, cached statistics, fidelity.

    before tracing   calibration_corpus()  reads --calib-text (or the built-in corpus's calibration split) —
                     bad text fails here, in a second; preflight() checks the int4 block against the model config
    pipeline         pass_context() hands the token stream and the progress display to 'calibrate'
    writing          save_calibration() caches the statistics as calibration.npz in the artifact
    after writing    measure_fidelity() compares the artifact with the fp32 model on evaluation text;
                     text_record() names both texts and their sha256 in the build report
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


from graphopt.quant.text import CORPUS_NAME, Corpus, default_corpus, default_corpus_sha256, read_text_file, \
    token_stream
from graphopt.measure.fidelity import EVAL_SEQ, artifact_logits, evaluate, torch_logits
from graphopt.core.manifest import load_manifest
from graphopt.passes.base import PassContext, PipelineResults
from graphopt.passes.pipeline import Recipe
from graphopt.build.precision import PrecisionError, check_block_divides
from graphopt.core.progress import Progress

CALIBRATION_FILE = "calibration.npz"
# The budgets (KL in nats, top-1 agreement) per weight precision. SmolLM2-135M on the built-in corpus
# (graphopt-prose-1, 2,040 positions): --int8 KL 0.0022, top-1 97.1% (within); --int4 (AWQ) KL 0.43, 63.5%;
# --fp8 KL 0.051, 84.9% (both over: promotion by --kl-budget is what meets them, not a looser line here).
BUDGETS = {"int8": (0.01, 0.97), "int4": (0.05, 0.93), "fp8": (0.01, None),
           "gguf": (1e-4, 0.999),  # --keep-quant: the GGUF's own values, against their fp32 dequantization
           "gptq": (1e-4, 0.999), "awq": (1e-4, 0.999)}  # --keep-quant of a Hugging Face GPTQ / AWQ checkpoint


def calibration_corpus(recipe: Recipe, calib_text: Path | None) -> Corpus | None:
    """The calibration text when the recipe calibrates; a one-line error for unusable text."""
    calibrates = any(spec.name == "calibrate" for spec in recipe.passes)
    if calib_text is not None and not calibrates:
        raise PrecisionError(f"--calib-text: recipe {recipe.name} has no 'calibrate' pass, so the text would be "
                             "unused; drop --calib-text or use a recipe that calibrates (--int4, --fp8)")
    if not calibrates:
        return None
    return read_text_file(calib_text, "--calib-text") if calib_text is not None else default_corpus("calibration")


def _keeps_quant(recipe: Recipe) -> bool:
    return any(spec.name == "keep-quant" for spec in recipe.passes)


def check_keep_quant(recipe: Recipe, spec: str) -> None:
    """Before loading: --keep-quant needs a GGUF whose quantized types all have an exact form, or a GPTQ/AWQ
    folder graphopt reads (one line naming the tensor and what is wrong otherwise; nothing is converted or
    written)."""
    if not _keeps_quant(recipe):
        return
    from graphopt import sources
    from graphopt.sources import gguf_weights

    path = sources.gguf_file_of(spec)
    if path is not None:
        gguf_weights.check_keep_quant(path)
    elif Path(spec).expanduser().is_dir():
        from graphopt.sources import hf_quant

        folder = Path(spec).expanduser()
        if hf_quant.method_of(folder) is not None:
            hf_quant.check_folder(folder, keep_quant=True)
        else:
            gguf_weights.refuse_unquantized_folder(folder)


def preflight(recipe: Recipe, config) -> None:
    """Checks that need only the model config, so a bad block size fails before the long trace."""
    for spec in recipe.passes:
        if spec.name == "quantize-int4":
            check_block_divides(int(spec.options.get("block_size", 32)), config)


def pass_context(options, corpus: Corpus | None, config, tokenizer, progress: Progress,
                 source=None) -> PassContext:
    """After loading, before tracing: preflight checks, then what passes need from the build (the
    calibration token stream for 'calibrate', the context length for 'fuse-qkv-rope', the GGUF's
    quantized weights for 'keep-quant')."""
    preflight(options.recipe, config)
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    quantized = None
    if _keeps_quant(options.recipe) and source is not None and source.gguf_path is not None:
        from graphopt.sources.gguf_weights import read_quantized

        with progress.step(f"reading the quantized blocks of {source.gguf_path.name}"):
            quantized = read_quantized(source.gguf_path)
    elif _keeps_quant(options.recipe) and source is not None and getattr(source, "quant_dir", None) is not None:
        from graphopt.sources.hf_quant import read_quantized as read_hf_quantized

        with progress.step(f"reading the quantized weights of {source.quant_dir.name}"):
            quantized = read_hf_quantized(source.quant_dir)
    if corpus is None:
        return PassContext(progress=progress, max_positions=max_positions, quantized_weights=quantized)
    ids = token_stream(tokenizer, corpus, options.calib_tokens, "--calib-tokens")
    return PassContext(calibration_tokens=ids, calibration_source=corpus.source, progress=progress,
                       max_positions=max_positions, quantized_weights=quantized)


def context_for(options, loaded, progress: Progress) -> PassContext:
    """The pass context of ``options.recipe`` on an already loaded model (several recipes from one trace:
    compare, the architecture matrix): its calibration text, then :func:`pass_context`."""
    corpus = calibration_corpus(options.recipe, options.calib_text)
    return pass_context(options, corpus, loaded.torch_model.config, loaded.tokenizer, progress, loaded.source)


def precision_of(results: PipelineResults, kv_dtype: str) -> dict[str, str]:
    """The manifest's precision: what the quantize passes recorded, fp32 elsewhere."""
    recorded = dict(results.precision)
    return {"weights": recorded.pop("weights", "fp32"), "activations": recorded.pop("activations", "fp32"),
            "kv_cache": recorded.pop("kv_cache", kv_dtype), **recorded}


def save_calibration(results: PipelineResults, staging: Path) -> dict[str, Any] | None:
    """Write calibration.npz when the pipeline calibrated; returns its summary for the report."""
    stats = results.calibration
    if stats is None:
        return None
    stats.save(staging / CALIBRATION_FILE)
    return stats.summary() | {"file": CALIBRATION_FILE}


def weight_precision(precision: dict[str, str]) -> str | None:
    """"int4", "int8", "fp8" or None (fp32 weights) from the manifest's precision."""
    first = precision["weights"].split()[0]
    return first if first in BUDGETS else None


def fidelity_budget(options, precision: dict[str, str]) -> tuple[float, float | None, str] | None:
    """(KL max, top-1 min or None, where it comes from): the user's ``--kl-budget`` alone, else the recipe's
    ``[budget]``, else the weights' precision's (BUDGETS); None for fp32 weights and no budget named."""
    if options.kl_budget is not None:
        return options.kl_budget, None, "--kl-budget"
    if options.recipe.budget is not None:
        return *options.recipe.budget, f"recipe {options.recipe.name}"
    kind = weight_precision(precision)
    return None if kind is None else (*BUDGETS[kind], f"{kind} weights")


def measure_fidelity(staging: Path, torch_model, tokenizer, options, progress: Progress,
                     timings: dict[str, float]) -> dict[str, Any]:
    """KL / top-1 / perplexity of the written artifact against the fp32 PyTorch model (BuildOptions
    ``eval_text`` or the built-in corpus's evaluation split, ``eval_tokens`` tokens), judged against
    :func:`fidelity_budget`; adds ``fidelity_s`` to ``timings``."""
    start = time.perf_counter()
    corpus = evaluation_corpus(options.eval_text)
    ids = token_stream(tokenizer, corpus, options.eval_tokens, "eval_tokens")
    with progress.bar(f"measuring fidelity vs fp32 on {ids.size} tokens", total=-(-ids.size // EVAL_SEQ)) as advance:
        fidelity = evaluate(artifact_logits(staging), torch_logits(torch_model), ids, corpus.source, advance=advance)
    out = fidelity.to_json() | {"text_sha256": corpus.sha256,
                                "reference": "fp32 PyTorch model (= the fp32 artifact within 1e-4)"}
    if (budget := fidelity_budget(options, load_manifest(staging, verify_hashes=False).precision)) is not None:
        kl_max, top1_min, source = budget
        misses = [f"KL {fidelity.kl_mean:.4f} > {kl_max}"] if fidelity.kl_mean > kl_max else []
        if top1_min is not None and fidelity.top1_agreement < top1_min:
            misses.append(f"top-1 {fidelity.top1_agreement:.1%} < {top1_min:.1%}")
        out["budget"] = {"kl_max": kl_max, "top1_min": top1_min, "within": not misses, "misses": misses,
                         "from": source}
    timings["fidelity_s"] = time.perf_counter() - start
    return out


def evaluation_corpus(eval_text: Path | None) -> Corpus:
    return read_text_file(eval_text, "eval_text") if eval_text is not None else default_corpus("evaluation")


def text_record(options, context: PassContext, fidelity: dict[str, Any] | None) -> dict[str, Any]:
    """The build report's ``text``: the built-in corpus's sha256 per split (in every report, so two
    reports show at a glance whether their figures came from the same text), then the calibration and
    evaluation text this build used (source, sha256, tokens), or None where it used none."""
    calibration = calibration_corpus(options.recipe, options.calib_text)
    used_calibration = None if calibration is None else calibration.to_json() | {
        "tokens": int(context.calibration_tokens.size)}
    used_evaluation = None if not fidelity else {"source": fidelity["text"], "sha256": fidelity["text_sha256"],
                                                 "tokens": fidelity["tokens"]}
    return {"corpus": {"name": CORPUS_NAME, "sha256": default_corpus_sha256()},
            "calibration": used_calibration, "evaluation": used_evaluation}
