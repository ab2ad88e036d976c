"""Fidelity of a quantized artifact against its fp32 reference, on evaluation text.

Both run the same token rows (``seq_len`` tokens, empty cache, logits at every position). For each
position t < len-1 the next-token distributions P (reference) and Q (candidate) are compared::

    KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v))      mean over positions (nats)
    top-1 agreement = mean [argmax P = argmax Q]
    perplexity = exp(mean −log P(x_{t+1}))          for P and for Q

The reference is another artifact (``graphopt eval``) or, during a build, the fp32 PyTorch model the
artifact was traced from (it matches the fp32 artifact to 1e-4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from graphopt.quant.text import rows

Logits = Callable[[np.ndarray], np.ndarray]  # token ids [S] → logits [S, V]
EVAL_SEQ = 256


@dataclasses.dataclass(frozen=True)
class Fidelity:
    tokens: int
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    ppl_reference: float
    ppl_candidate: float
    text: str

    def to_json(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position KL(P‖Q), top-1 match and both NLLs; logits [T, V], targets [T] (the next tokens)."""
    log_p, log_q = log_softmax(reference), log_softmax(candidate)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    index = np.arange(targets.size)
    return {"kl": np.maximum(kl, 0.0), "top1": reference.argmax(-1) == candidate.argmax(-1),
            "nll_p": -log_p[index, targets], "nll_q": -log_q[index, targets]}


def evaluate(candidate: Logits, reference: Logits, ids: np.ndarray, text: str, seq_len: int = EVAL_SEQ,
             advance: Callable[[int], None] = lambda n: None) -> Fidelity:
    """Run both over ``ids`` cut into rows of ``seq_len``; aggregate the per-position comparisons."""
    parts: dict[str, list[np.ndarray]] = {"kl": [], "top1": [], "nll_p": [], "nll_q": []}
    for row in rows(ids, seq_len):
        got = compare(reference(row)[:-1], candidate(row)[:-1], row[1:])
        for key, value in got.items():
            parts[key].append(value)
        advance(1)
    merged = {key: np.concatenate(value) for key, value in parts.items()}
    return Fidelity(int(merged["kl"].size), float(merged["kl"].mean()), float(np.percentile(merged["kl"], 99)),
                    float(merged["top1"].mean()), float(np.exp(merged["nll_p"].mean())),
                    float(np.exp(merged["nll_q"].mean())), text)


def artifact_logits(artifact: Path, max_seq: int = EVAL_SEQ) -> Logits:
    """Logits at every position of one row, from an artifact on its engine (fresh cache per row)."""
    from graphopt.runtime.engine_api import open_engine

    engine = open_engine(artifact, max_slots=1, max_seq=max_seq, threads=None)

    def run(row: np.ndarray) -> np.ndarray:
        seq = row.size
        positions = np.arange(seq, dtype=np.int64)[None]
        logits = engine.step(row[None].astype(np.int64), positions, np.zeros(1, np.int32),
                             np.full(1, seq, np.int32), positions)
        return logits[0].copy()

    return run


def torch_logits(torch_model) -> Logits:
    """Logits at every position from the fp32 PyTorch model (no cache)."""
    import torch

    def run(row: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            ids = torch.from_numpy(row.astype(np.int64))[None]
            return torch_model(input_ids=ids, use_cache=False).logits[0].float().numpy()

    return run



def graph_logits(model) -> Logits:
    """Logits at every position of one row from an in-memory graph at any stage of a pipeline (FlashAttention
    expanded to its reference, Q/DQ exact, an empty cache of the row's length): ``compare --bisect`` and
    ``build --kl-budget`` measure unwritten graphs this way."""
    from graphopt.plugins.reference_run import empty_cache_feeds, reference_session

    session = reference_session(model)
    output = next(o.name for o in session.get_outputs() if o.name == "logits")

    def run(row: np.ndarray) -> np.ndarray:
        return session.run([output], empty_cache_feeds(session, row[None]))[0][0]

    return run
