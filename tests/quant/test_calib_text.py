"""Calibration/evaluation text: the built-in corpus and its splits, token rows; fidelity metrics."""

from __future__ import annotations

import re

import numpy as np
import pytest

from graphopt.quant.text import CORPUS_NAME, CalibrationTextError, default_corpus, default_corpus_sha256, rows
from graphopt.measure.fidelity import compare, evaluate

# Pinned: changing the corpus changes every fidelity figure, so it is a deliberate act (corpus/README.md)
SHA256 = {"calibration": "46b28bc5f72595d34497c2cdb142d302850a3a561adc06cf30c0b84257090089",
          "evaluation": "be64d7d05c13d14e2daa80adc63d3b53f2fa5d48af17c5494a26eb575fedf32d"}


def test_default_corpus_is_the_pinned_text_in_two_disjoint_splits() -> None:
    calibration, evaluation = default_corpus("calibration"), default_corpus("evaluation")
    assert default_corpus_sha256() == SHA256 and calibration.source == f"{CORPUS_NAME} (calibration split)"
    assert calibration.to_json() == {"source": calibration.source, "sha256": SHA256["calibration"]}
    # enough words for CALIB_TOKENS and EVAL_TOKENS (SmolLM2: about 1.15 tokens per word of this prose)
    assert len(calibration.text.split()) > 3600 and len(evaluation.text.split()) > 1900

    def sentences(text: str) -> set[str]:
        return {s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if len(s.split()) > 4}

    assert not sentences(calibration.text) & sentences(evaluation.text)
    assert all(ord(ch) < 128 for ch in calibration.text + evaluation.text)  # plain ASCII prose
    with pytest.raises(CalibrationTextError, match="use one of"):
        default_corpus("training")


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
