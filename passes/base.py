"""What every graphopt pass shares: an onnx-ir InPlacePass with named counters.

A pass fills ``self.stats`` (counters shown in the pipeline table and the build report) and
``self.notes`` (patterns it saw but did not rewrite, each with the reason — never silent).
"""

from __future__ import annotations

import onnx_ir as ir

GRAPHOPT_DOMAIN = "graphopt"


class GraphoptPass(ir.passes.InPlacePass):
    """Base class. Subclasses set ``name`` (stable kebab-case) and document options in the docstring."""

    name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, int] = {}
        self.notes: list[str] = []

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def note(self, message: str) -> None:
        self.notes.append(message)
