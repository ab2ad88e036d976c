"""canonicalize-linear: a Gemm with constant weights becomes the MatMul (+ Add bias) every later pass knows.

transformers' Conv1D (GPT-2, and models built on it) exports as a 2-D Gemm between two Reshapes::

    before:  x [B,S,K] ─Reshape→[B·S,K]─ Gemm(·, W [K,N], b [N]) ─Reshape→[B,S,N]─► y
    after:   x [B,S,K] ─ MatMul(·, W) ─ Add(·, b) ─► y

so quantization (which finds linears as MatMul with a [K,N] initializer), the lm_head cut and the ORT
kernels see one form. ``transB = 1`` weights are transposed once here; alpha/beta other than 1 and
``transA = 1`` are left alone (noted). Statistics: ``gemm_to_matmul``, ``reshapes_removed``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes._edit import attr, const_array, initializer, only_consumer, producer
from graphopt.passes.base import GraphoptPass


class CanonicalizeLinearPass(GraphoptPass):
    """Gemm with constant weights → MatMul (+ Add), dropping the 2-D Reshapes around it."""

    name = "canonicalize-linear"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in [n for n in graph if n.op_type == "Gemm" and n.domain in ("", "ai.onnx")]:
            reason = _unsupported(node)
            if reason:
                self.note(f"Gemm {node.name!r} kept: {reason}")
                continue
            self._rewrite(graph, node)
        return ir.passes.PassResult(model, bool(self.stats))

    def _rewrite(self, graph: ir.Graph, gemm: ir.Node) -> None:
        a, weight = gemm.inputs[0], gemm.inputs[1]
        bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        if attr(gemm, "transB", 0):
            array = const_array(weight).T.copy()
            weight = initializer(graph, f"{weight.name}_t", array)
        source, target = a, gemm.outputs[0]
        flatten, restore = producer(a, "Reshape"), only_consumer(gemm.outputs[0])
        if _is_merge(flatten, restore):
            source, target = flatten.inputs[0], restore.outputs[0]
            self.count("reshapes_removed", 2)
        out = ir.node("MatMul", [source, weight], name=f"{gemm.name}_matmul").outputs[0]
        out.shape, out.dtype = target.shape, target.dtype
        nodes = [out.producer()]
        if bias is not None:
            out = ir.node("Add", [out, bias], name=f"{gemm.name}_bias").outputs[0]
            nodes.append(out.producer())
        out.shape, out.dtype = target.shape, target.dtype
        graph.insert_before(gemm, nodes)
        target.replace_all_uses_with(out, replace_graph_outputs=True)
        self.count("gemm_to_matmul")


def _unsupported(gemm: ir.Node) -> str | None:
    if attr(gemm, "transA", 0):
        return "transA = 1"
    if attr(gemm, "alpha", 1.0) != 1.0 or attr(gemm, "beta", 1.0) != 1.0:
        return "alpha or beta is not 1"
    weight = const_array(gemm.inputs[1])
    if weight is None or weight.ndim != 2:
        return "weights are not a 2-D constant"
    bias = const_array(gemm.inputs[2]) if len(gemm.inputs) > 2 and gemm.inputs[2] is not None else np.zeros(1)
    if bias is None or bias.ndim > 1:
        return "bias is not a constant vector"
    return None


def _is_merge(flatten: ir.Node | None, restore: ir.Node | None) -> bool:
    """x [..., K] ─Reshape→[M,K] … Reshape→[..., N] with x's leading dims: both Reshapes can go."""
    if flatten is None or restore is None or restore.op_type != "Reshape":
        return False
    x, y = flatten.inputs[0], restore.outputs[0]
    if x.shape is None or y.shape is None or len(x.shape) != len(y.shape) or len(x.shape) < 3:
        return False
    return list(x.shape)[:-1] == list(y.shape)[:-1] and len(flatten.outputs[0].uses()) == 1
