"""Calibration: run the fp32 graph on ONNX Runtime over calibration tokens and keep activation statistics.

The graph is run as it stands in the pipeline (canonical ops, ``graphopt::FlashAttention`` through
its reference expansion), one row of ``seq_len`` tokens per call with an empty cache and every
position's logits requested, with the named activations added as graph outputs. Per activation
(channels = the last axis) it keeps::

    mean_abs [C], max_abs [C]   per-channel mean / max of |x| (AWQ, SmoothQuant)
    amax, percentile            per-tensor max |x| and the mean over rows of the 99.99th percentile
    sample [R, C]               R random token rows (AWQ's scale and clip searches)

The statistics (without the samples) are saved in the artifact as ``calibration.npz``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.plugins.reference_run import empty_cache_feeds, reference_session

PERCENTILE = 99.99


@dataclasses.dataclass
class ValueStats:
    mean_abs: np.ndarray
    max_abs: np.ndarray
    amax: float
    percentile: float
    sample: np.ndarray


@dataclasses.dataclass
class CalibrationStats:
    values: dict[str, ValueStats]
    tokens: int
    rows: int
    source: str

    def get(self, name: str) -> ValueStats | None:
        return self.values.get(name)

    def save(self, path: Path) -> None:
        """Per-channel and per-tensor statistics (not the samples) as one .npz file."""
        arrays: dict[str, np.ndarray] = {}
        for i, (name, stats) in enumerate(sorted(self.values.items())):
            arrays[f"{i}.name"] = np.array(name)
            arrays[f"{i}.mean_abs"], arrays[f"{i}.max_abs"] = stats.mean_abs, stats.max_abs
            arrays[f"{i}.amax_percentile"] = np.array([stats.amax, stats.percentile], np.float32)
        arrays["meta"] = np.array([self.tokens, self.rows], np.int64)
        arrays["source"] = np.array(self.source)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    def summary(self) -> dict:
        return {"tokens": self.tokens, "rows": self.rows, "source": self.source, "activations": len(self.values)}


class _Accumulator:
    """Running statistics of one activation over the calibration rows."""

    def __init__(self, channels: int, sample_per_row: int) -> None:
        self.sum_abs = np.zeros(channels, np.float64)
        self.max_abs = np.zeros(channels, np.float32)
        self.count = 0
        self.percentiles: list[float] = []
        self.samples: list[np.ndarray] = []
        self.sample_per_row = sample_per_row

    def add(self, x: np.ndarray, rng: np.random.Generator) -> None:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
        magnitude = np.abs(flat)
        self.sum_abs += magnitude.sum(axis=0)
        self.max_abs = np.maximum(self.max_abs, magnitude.max(axis=0))
        self.count += flat.shape[0]
        self.percentiles.append(float(np.percentile(magnitude, PERCENTILE)))
        take = min(self.sample_per_row, flat.shape[0])
        self.samples.append(flat[np.sort(rng.choice(flat.shape[0], size=take, replace=False))])

    def finish(self) -> ValueStats:
        return ValueStats((self.sum_abs / max(self.count, 1)).astype(np.float32), self.max_abs,
                          float(self.max_abs.max()), float(np.mean(self.percentiles)), np.concatenate(self.samples))


def collect(model: ir.Model, names: Iterable[str], token_rows: list[np.ndarray], sample_rows: int,
            source: str, advance: Callable[[int], None] = lambda n: None) -> CalibrationStats:
    """Run ``model`` over ``token_rows`` (1-D int arrays) and return statistics of the named values."""
    wanted = sorted(set(names))
    session = _session(model, wanted)
    rng = np.random.default_rng(0)
    per_row = max(1, -(-sample_rows // max(len(token_rows), 1)))
    accumulators: dict[str, _Accumulator] = {}
    tokens = 0
    for row in token_rows:
        outputs = session.run([f"calib::{name}" for name in wanted], empty_cache_feeds(session, row[None]))
        for name, value in zip(wanted, outputs):
            acc = accumulators.setdefault(name, _Accumulator(value.shape[-1], per_row))
            acc.add(value, rng)
        tokens += row.size
        advance(1)
    values = {name: acc.finish() for name, acc in accumulators.items()}
    return CalibrationStats(values, tokens, len(token_rows), source)


def _session(model: ir.Model, names: list[str]):
    """An ORT session of a copy of ``model`` (FlashAttention expanded) that also outputs ``names``.

    Each activation is tapped through an Identity named ``calib::NAME`` before the expansion, which
    renames the attention outputs it replaces.
    """
    def tap(runnable: ir.Model) -> None:
        values = {v.name: v for node in runnable.graph for v in node.outputs}
        for name in names:
            node = ir.node("Identity", [values[name]], name=f"calib::{name}")
            node.outputs[0].name, node.outputs[0].dtype = f"calib::{name}", values[name].dtype
            runnable.graph.append(node)
            runnable.graph.outputs.append(node.outputs[0])

    return reference_session(model, mutate=tap)
