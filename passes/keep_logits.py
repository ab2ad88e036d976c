"""keep-logits: compute the lm_head only for the positions the runtime asks for.

    before:  h [B,S,E] ─MatMul(W_lm)─► logits [B,S,V]
    after:   h [B,S,E] ─GatherND(Unsqueeze(logit_positions,-1), batch_dims=1)─► [B,K,E] ─MatMul(W_lm)─► logits [B,K,V]

New input ``logit_positions`` int64 [B, K]. Prefill asks for one position per row (the last valid
token), decode for one, speculative verification for k+1: the lm_head (21% of SmolLM2's weights)
runs on K rows instead of S.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes.base import GraphoptPass

_ELEMENTWISE = {"Add", "Mul", "Div", "Tanh", "Cast", "Softcap"}


class KeepLogitsPass(GraphoptPass):
    """Gather hidden rows at ``logit_positions`` before the lm_head."""

    name = "keep-logits"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if "logit_positions" in {v.name for v in graph.inputs}:
            return ir.passes.PassResult(model, False)
        lm_head = _find_lm_head(graph)
        hidden = lm_head.inputs[0]
        positions = ir.Value(name="logit_positions", type=ir.TensorType(ir.DataType.INT64),
                             shape=ir.Shape(["batch", "num_logits"]))
        graph.inputs.append(positions)
        tape = ir.tape.Tape()
        axes = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([-1], np.int64))})
        indices = tape.op("Unsqueeze", [positions, axes])
        gathered = tape.op("GatherND", [hidden, indices], attributes={"batch_dims": 1})
        gathered.dtype = hidden.dtype
        gathered.shape = ir.Shape(["batch", "num_logits", hidden.shape[-1]])
        graph.insert_before(lm_head, tape.nodes)
        lm_head.replace_input_with(0, gathered)
        logits = next(v for v in graph.outputs if v.name == "logits")
        for value in (lm_head.outputs[0], logits):  # the row axis is now K, not S
            value.shape = ir.Shape(["batch", "num_logits", logits.shape[-1] if logits.shape else None])
        self.count("lm_head_rows_gathered")
        return ir.passes.PassResult(model, True)


def _find_lm_head(graph: ir.Graph) -> ir.Node:
    outputs = [v for v in graph.outputs if v.name == "logits"]
    if not outputs:
        raise PassError("keep-logits: the graph has no 'logits' output; trace the model with graphopt first")
    node = outputs[0].producer()
    while node is not None and node.op_type in _ELEMENTWISE:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "MatMul":
        found = node.op_type if node is not None else "a graph input"
        raise PassError(f"keep-logits: 'logits' comes from {found}, not MatMul(hidden, weight); "
                        "drop keep-logits from the recipe for this model")
    shape = node.inputs[0].shape
    if shape is None or len(shape) != 3:
        raise PassError("keep-logits: lm_head input is not rank 3 [B,S,E]; drop keep-logits for this model")
    return node
