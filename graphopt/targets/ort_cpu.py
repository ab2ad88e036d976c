"""``ort-cpu``: ONNX Runtime's CPU execution provider, run by runtime/engine.py's OrtEngine.

Recipes ``models/ort-cpu[-int4|-int8|-fp8].toml`` end in ``lower-ort-cpu``, which turns graphopt's ops into
ONNX Runtime's fused ones (GroupQueryAttention, MatMulNBits, …). The artifact also gets
``model_verify.onnx`` when it can: GroupQueryAttention refuses several rows of several tokens over a cache,
which speculative verification and batched chunked prefill need, so the same contract is written with
standard Attention + TensorScatter (passes/lower_verify.py) and shares model.onnx.data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from graphopt.core.errors import GraphoptError
from graphopt.targets.base import Target, TargetError

if TYPE_CHECKING:  # the registry imports every target when the runtime opens an artifact: keep it light
    import onnx_ir as ir

log = logging.getLogger(__name__)


class OrtCpu(Target):
    name = "ort-cpu"
    description = "ONNX Runtime, CPU execution provider"
    engine = "graphopt.runtime.engine:OrtEngine"

    def check_graph(self, model: ir.Model, recipe) -> None:
        left = sorted({n.op_type for n in model.graph if n.domain == "graphopt"})
        if left:
            raise TargetError(f"recipe {recipe.name} targets {self.name} but leaves graphopt ops {left} unlowered; "
                              "add 'lower-ort-cpu' at the end of the recipe")

    def extra_graphs(self, staging: Path, model: ir.Model) -> dict[str, str]:
        from graphopt.passes.lower_verify import GRAPHS_KEY, is_gqa, write_verify_graph

        if not any(is_gqa(n) for n in model.graph):
            return {}
        try:
            return {GRAPHS_KEY: write_verify_graph(staging).name}
        except GraphoptError as exc:  # the artifact still runs: multi-token steps go one row per call
            log.warning("no multi-token graph: %s", exc)
            return {}


TARGET = OrtCpu()
