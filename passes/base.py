"""What every graphopt pass shares: an onnx-ir InPlacePass with named counters.

A pass fills ``self.stats`` (counters shown in the pipeline table and the build report) and
``self.notes`` (patterns it saw but did not rewrite, each with the reason — never silent).

A pass that changes the numbers on purpose (quantization) sets ``lossy``: ``--verify`` then still
checks the graph and records how far the logits moved, but does not hold it to the lossless
tolerance. What a pass needs from the build besides its options (calibration tokens, a progress
display) arrives in ``self.context``, set by the pipeline runner — never through globals.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from graphopt.core.progress import Progress

GRAPHOPT_DOMAIN = "graphopt"


@dataclasses.dataclass
class PipelineResults:
    """What passes hand to later passes and to the artifact writer, fresh for every pipeline run.

    calibration: the CalibrationStats 'calibrate' measured (quantize passes read them; calibration.npz).
    precision: what the quantize and lowering passes did (the manifest's ``precision``).
    trt_profiles: lower-trt's profile ranges (the manifest's ``optimization_profiles``).
    """

    calibration: Any = None
    precision: dict[str, str] = dataclasses.field(default_factory=dict)
    trt_profiles: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Build inputs a pass may use (``calibration_tokens``: the token stream 'calibrate' runs over) and
    ``results``, where passes leave what later passes and the writer need (never ``model.meta``)."""

    calibration_tokens: np.ndarray | None = None
    calibration_source: str = ""
    progress: Progress | None = None
    max_positions: int | None = None  # the model's context length (config max_position_embeddings)
    quantized_weights: Any = None  # a GGUF's pre-quantized weights for 'keep-quant' (sources.gguf_weights)
    results: PipelineResults = dataclasses.field(default_factory=PipelineResults)


class GraphoptPass(ir.passes.InPlacePass):
    """Base class. Subclasses set ``name`` (stable kebab-case) and document options in the docstring."""

    name: str = ""
    lossy: bool = False  # changes the logits on purpose (quantization); instances may override
    context: PassContext = PassContext()

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, int] = {}
        self.notes: list[str] = []

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def note(self, message: str) -> None:
        self.notes.append(message)
