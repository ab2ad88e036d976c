"""Calibration/evaluation text: prose filtering, the default corpus split, token rows; fidelity metrics."""

from __future__ import annotations

import numpy as np

from graphopt.quant.text import default_corpus, prose_paragraphs, rows
from graphopt.measure.fidelity import compare, evaluate

PROSE = ("This library turns graphs into fast programs. It reads a model, rewrites it with passes, and writes "
         "an artifact that a server can load without Python. Each pass records what it changed.")


def test_prose_filter_keeps_sentences_and_drops_code_and_markup() -> None:
    text = "\n\n".join([
        PROSE,
        "# Installation",
        "```python\nimport graphopt\ngraphopt.build.artifact('x')\n```",
        "    indented_code = True  # a literal block with enough letters to pass the length test easily",
        "| col | col |\n|-----|-----|\n| a | b |",
        "Short line.",
        "https://example.com/" + "x" * 200,
    ])
    assert prose_paragraphs(text) == [PROSE]


def test_default_corpus_splits_are_disjoint_prose() -> None:
    calibration, evaluation = default_corpus("calibration"), default_corpus("evaluation")
    assert len(calibration.text) > 5000 and len(evaluation.text) > 5000
    assert "calibration split" in calibration.source and calibration.sha256 != evaluation.sha256
    assert not set(calibration.text.split("\n\n")) & set(evaluation.text.split("\n\n"))


def test_rows_cut_a_stream_and_drop_a_one_token_tail() -> None:
    ids = np.arange(10)
    assert [r.tolist() for r in rows(ids, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [r.size for r in rows(np.arange(9), 4)] == [4, 4]


def test_kl_top1_and_perplexity_against_numpy() -> None:
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5, 7))
    candidate = reference + rng.normal(scale=0.1, size=(5, 7))
    targets = np.array([1, 2, 3, 4, 5])
    got = compare(reference, candidate, targets)
    p = np.exp(reference) / np.exp(reference).sum(-1, keepdims=True)
    q = np.exp(candidate) / np.exp(candidate).sum(-1, keepdims=True)
    np.testing.assert_allclose(got["kl"], (p * np.log(p / q)).sum(-1), rtol=1e-9)
    np.testing.assert_allclose(got["nll_q"], -np.log(q[np.arange(5), targets]))
    np.testing.assert_array_equal(got["top1"], p.argmax(-1) == q.argmax(-1))


def test_evaluate_identical_models_is_perfect() -> None:
    table = np.random.default_rng(1).normal(size=(50, 50))
    same = lambda row: table[row]  # noqa: E731  a "model" whose logits depend on the current token
    fidelity = evaluate(same, same, np.arange(40) % 50, "test", seq_len=16)
    assert fidelity.tokens == 40 - 3 and fidelity.kl_mean == 0 and fidelity.top1_agreement == 1.0
    assert fidelity.ppl_reference == fidelity.ppl_candidate > 1
