"""``canonical``: the target-independent graph (FlashAttention with the KV-cache contract, nothing lowered).

No engine runs it: ONNX Runtime runs it only through the FlashAttention reference expansion
(plugins/reference_run.py), which is what ``--verify`` and the lowering tests compare against.
"""

from __future__ import annotations

from graphopt.targets.base import Target


class Canonical(Target):
    name = "canonical"
    description = "fused and cached, not lowered (a reference for tests and --dump-after)"
    engine = ""  # none: open_engine says so
    measures_fidelity = False


TARGET = Canonical()
