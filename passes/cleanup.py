"""cleanup: constant folding (with size limits), common-subexpression elimination, dead code.

Reuses onnxscript's optimizer (folding + its basic rewrite rules such as Transpose∘Transpose
and Reshape∘Reshape) and onnx-ir's CSE / unused-node passes; counts what disappeared::

    before:  Shape─Gather─Concat─Reshape(x)   Cos(pos)×L  Sin(pos)×L   dead mask subgraph
    after:   Reshape(x, const)                Cos(pos)    Sin(pos)     —

Options:
    fold_input_limit: largest constant input (elements) folded (default 8192).
    fold_output_limit: largest folded output (elements) kept as a constant (default 262144).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from graphopt.passes.base import GraphoptPass


class CleanupPass(GraphoptPass):
    """Fold constants, remove duplicates and dead nodes."""

    name = "cleanup"

    def __init__(self, fold_input_limit: int = 8192, fold_output_limit: int = 262144) -> None:
        super().__init__()
        self.fold_input_limit = fold_input_limit
        self.fold_output_limit = fold_output_limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = model.graph.num_nodes()
        initializers = len(model.graph.initializers)
        onnxscript.optimizer.optimize_ir(
            model, num_iterations=2, onnx_shape_inference=False, inline=True,
            input_size_limit=self.fold_input_limit, output_size_limit=self.fold_output_limit,
        )
        common.CommonSubexpressionEliminationPass()(model)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        after = model.graph.num_nodes()
        self.count("nodes_removed", before - after)
        self.count("initializers_removed", initializers - len(model.graph.initializers))
        return ir.passes.PassResult(model, after != before or initializers != len(model.graph.initializers))
