"""graphopt eval: fidelity of an artifact against a reference artifact (usually its fp32 build)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from graphopt.core.errors import ArtifactError
from graphopt.quant.text import EVAL_TOKENS


def check_pair(candidate, reference) -> None:
    """Both artifacts must predict over the same vocabulary from the same tokenizer."""
    if candidate.dims.vocab_size != reference.dims.vocab_size:
        raise ArtifactError(f"the artifacts have different vocabularies ({candidate.dims.vocab_size} vs "
                            f"{reference.dims.vocab_size}); compare builds of the same model")
    if candidate.source.sha256 != reference.source.sha256:
        raise ArtifactError(f"the artifacts were built from different weights ({candidate.source.id} vs "
                            f"{reference.source.id}); pass the fp32 build of the same model as --reference")


@click.command("eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="The artifact to compare with (the fp32 build of the same model).")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="UTF-8 evaluation text (default: graphopt's built-in corpus, evaluation split).")
@click.option("--tokens", default=EVAL_TOKENS, show_default=True, help="Evaluation tokens (rows of 256).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_command(artifact: Path, reference: Path, text: Path | None, tokens: int, as_json: bool) -> None:
    """KL divergence, top-1 agreement and perplexities of ARTIFACT against --reference."""
    from graphopt.runtime.tokenizer import load_tokenizer

    from graphopt.quant.text import default_corpus, read_text_file, token_stream
    from graphopt.measure.fidelity import EVAL_SEQ, artifact_logits, evaluate
    from graphopt.core.manifest import load_manifest
    from graphopt.core.progress import Progress

    candidate_manifest, reference_manifest = load_manifest(artifact), load_manifest(reference)
    check_pair(candidate_manifest, reference_manifest)
    corpus = read_text_file(text, "--text") if text is not None else default_corpus("evaluation")
    tokenizer = load_tokenizer(artifact)
    ids = token_stream(tokenizer, corpus, tokens, "--tokens")
    progress = Progress(enabled=not as_json)
    with progress.step("loading both artifacts"):
        candidate, baseline = artifact_logits(artifact), artifact_logits(reference)
    with progress.bar(f"comparing next-token distributions on {ids.size} tokens", -(-ids.size // EVAL_SEQ)) as step:
        fidelity = evaluate(candidate, baseline, ids, corpus.source, advance=step)
    result = {"artifact": str(artifact), "reference": str(reference),
              "precision": candidate_manifest.precision, **fidelity.to_json(), "text_sha256": corpus.sha256}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{artifact} vs {reference} on {fidelity.tokens} tokens of {fidelity.text} "
               f"(sha256 {corpus.sha256[:16]}…)")
    click.echo(f"  KL(reference ‖ artifact)  mean {fidelity.kl_mean:.5f}  p99 {fidelity.kl_p99:.5f} nats")
    click.echo(f"  top-1 agreement           {fidelity.top1_agreement:.2%}")
    click.echo(f"  perplexity                reference {fidelity.ppl_reference:.3f}, artifact "
               f"{fidelity.ppl_candidate:.3f}")
