"""Graph side of quantization, shared by the quantize-* passes: find weights, insert Q/DQ, fold scales.

    Linear     MatMul(x [B,S,K], W [K,N] initializer)
    Embedding  Gather(E [V,H] initializer, input_ids), and when tied the lm_head MatMul(h, Transpose(E))

The quantized weights enter the graph as standard ``DequantizeLinear`` (zero-point 0) — the math
that computes them lives in graphopt.quant.numerics / graphopt.quant.awq.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._edit import initializer
from graphopt.passes.base import PassContext
from graphopt.quant.numerics import Quantized

_STORAGE = {"int4": ir.DataType.INT4, "int8": ir.DataType.INT8, "fp8": ir.DataType.FLOAT8E4M3FN}


@dataclasses.dataclass(frozen=True)
class Linear:
    node: ir.Node

    @property
    def weight(self) -> ir.Value:  # read each time: folding a scale may swap in a new initializer
        return self.node.inputs[1]

    @property
    def array(self) -> np.ndarray:
        return self.weight.const_value.numpy()


@dataclasses.dataclass(frozen=True)
class Embedding:
    gather: ir.Node
    table: ir.Value
    lm_head: ir.Node | None  # MatMul(h, Transpose(table)) when the lm_head is tied to the embedding

    @property
    def array(self) -> np.ndarray:
        return self.table.const_value.numpy()


def _float_initializer(value: ir.Value | None, rank: int) -> bool:
    return (value is not None and value.const_value is not None and value.producer() is None
            and value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) == rank)


def find_linears(graph: ir.Graph) -> list[Linear]:
    """MatMuls whose second input is a float [K, N] initializer, in graph order."""
    return [Linear(n) for n in graph
            if n.op_type == "MatMul" and n.domain == "" and _float_initializer(n.inputs[1], 2)]


def find_embedding(graph: ir.Graph) -> Embedding | None:
    """The token embedding Gather (table from an initializer, indices = input_ids) and its tied lm_head."""
    for node in graph:
        if node.op_type == "Gather" and node.domain == "" and _float_initializer(node.inputs[0], 2) \
                and node.inputs[1] is not None and node.inputs[1].name == "input_ids":
            return Embedding(node, node.inputs[0], _tied_lm_head(node.inputs[0]))
    return None


def _tied_lm_head(table: ir.Value) -> ir.Node | None:
    for use in table.uses():
        node = use.node
        if node.op_type == "Transpose" and tuple(node.attributes["perm"].value) == (1, 0):
            for consumer in node.outputs[0].uses():
                if consumer.node.op_type == "MatMul" and consumer.idx == 1:
                    return consumer.node
    return None


def storage_tensor(qz: Quantized, name: str) -> ir.Tensor:
    """The quantized values as an ONNX tensor of the kind's type (int4 is packed on save)."""
    if qz.kind == "fp8":
        return ir.Tensor(qz.q.astype(ml_dtypes.float8_e4m3fn), name=name)
    return ir.Tensor(qz.q, dtype=_STORAGE[qz.kind], name=name)


def dequantize_node(graph: ir.Graph, anchor: ir.Node, qz: Quantized, name: str) -> ir.Value:
    """Initializers ``name``_q and ``name``_scale + DequantizeLinear before ``anchor``; returns its output."""
    q = ir.Value(name=f"{name}_q", const_value=storage_tensor(qz, f"{name}_q"))
    q.shape, q.dtype = ir.Shape(qz.q.shape), _STORAGE[qz.kind]
    graph.register_initializer(q)
    scale = initializer(graph, f"{name}_scale", qz.scale.astype(np.float32))
    attributes = {"axis": qz.axis} | ({"block_size": qz.block_size} if qz.block_size else {})
    node = ir.node("DequantizeLinear", [q, scale], attributes=attributes, name=f"{name}_DequantizeLinear")
    node.outputs[0].name, node.outputs[0].dtype = f"{name}_dq", ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape(qz.q.shape)
    graph.insert_before(anchor, node)
    return node.outputs[0]


def quantize_activation(graph: ir.Graph, x: ir.Value, scale: float | None, kind: str) -> ir.Value:
    """x ─Q─DQ─► x̂ placed right after x's producer: static (``scale``) or int8 dynamic (scale None).

    Static uses zero-point 0 (an e4m3fn zero tensor for fp8, ``output_dtype`` int8 for int8); dynamic
    is DynamicQuantizeLinear (uint8, per tensor, scale and zero point computed per call).
    """
    tape = ir.tape.Tape()
    if scale is None:
        q, s, zp = tape.op_multi_out("DynamicQuantizeLinear", [x], num_outputs=3)
        out = tape.op("DequantizeLinear", [q, s, zp])
    elif kind == "fp8":
        s = initializer(graph, f"{x.name}_act_scale", np.array(scale, np.float32))
        zp = initializer(graph, f"{x.name}_act_zero_point", np.zeros((), ml_dtypes.float8_e4m3fn))
        out = tape.op("DequantizeLinear", [tape.op("QuantizeLinear", [x, s, zp]), s, zp])
    else:  # int8 via output_dtype, no zero-point tensor: ORT 1.32 mis-types an int8 zero point it
        # propagates through a following Reshape ("output_dtype INT8 does not match y_zero_point type UINT8")
        s = initializer(graph, f"{x.name}_act_scale", np.array(scale, np.float32))
        q = tape.op("QuantizeLinear", [x, s], attributes={"output_dtype": ir.DataType.INT8})
        out = tape.op("DequantizeLinear", [q, s])
    out.name, out.dtype, out.shape = f"{x.name}_qdq", x.dtype, x.shape
    producer = x.producer()
    if producer is not None:
        graph.insert_after(producer, tape.nodes)
    else:
        graph.insert_before(graph.node(0), tape.nodes)
    return out


def group_by_input(linears: list[Linear]) -> dict[str, list[Linear]]:
    """Linears keyed by the name of their input activation (q/k/v share one, gate/up another)."""
    groups: dict[str, list[Linear]] = {}
    for lin in linears:
        groups.setdefault(lin.node.inputs[0].name, []).append(lin)
    return groups


def quantize_group_input(graph: ir.Graph, group: list[Linear], scale: float | None, kind: str) -> None:
    """One activation Q/DQ on the shared input of ``group`` (see :func:`quantize_activation`)."""
    x_hat = quantize_activation(graph, group[0].node.inputs[0], scale, kind)
    for lin in group:
        lin.node.replace_input_with(0, x_hat)


def layer_name(node: ir.Node) -> str:
    """A MatMul's name for recipes (``keep``, ``promote``): the module the exporter recorded for it, as Hugging
    Face names it (``model.layers.0.self_attn.q_proj``, ``lm_head``); else its weight's name. The tied
    embedding is ``lm_head`` (:func:`embedding_name`)."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    names = [part.strip(" '\"") for part in scopes.strip("[]").split(",")]
    if len(names) >= 2 and names[-2].startswith("model."):  # graphopt's trace wraps the model as 'model'
        return names[-2].removeprefix("model.")
    return (node.inputs[1].name or node.name or "").removesuffix(".weight")


def embedding_name(embedding: Embedding) -> str:
    table = (embedding.table.name or "").removesuffix(".weight").removeprefix("model.")
    return "lm_head" if embedding.lm_head is not None else table


def matches(name: str, patterns: Sequence[str] | None) -> bool:
    """``name`` equals one of ``patterns`` or matches it as a shell pattern (``model.layers.0.*``)."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns or ())


def weight_targets(graph: ir.Graph, embedding: bool, keep: Sequence[str] | None = None
                   ) -> tuple[list[Linear], Embedding | None, list[ir.Value]]:
    """What a quantize pass rewrites: the linears, the embedding (when asked), and their fp32 weights;
    those whose :func:`layer_name` matches a ``keep`` pattern stay fp32 (the tied embedding with ``lm_head``)."""
    linears = [lin for lin in find_linears(graph) if not matches(layer_name(lin.node), keep)]
    table = find_embedding(graph) if embedding else None
    table = None if table is not None and matches(embedding_name(table), keep) else table
    fp32 = [lin.weight for lin in linears] + ([table.table] if table else [])
    return linears, table, fp32


def kept_count(graph: ir.Graph, linears: list[Linear], embedding: Embedding | None, asked: bool) -> int:
    """How many linears (the tied lm_head counted as one) ``keep`` left in fp32."""
    table = find_embedding(graph) if asked else None
    return len(find_linears(graph)) - len(linears) + (table is not None and embedding is None)


def drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove initializers no node reads any more (fp32 weights replaced by their Q/DQ form)."""
    for value in values:
        if not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)


def fold_target(x: ir.Value, linears: list[Linear]) -> str | None:
    """How :func:`fold_input_scale` would absorb 1/s for input ``x``: "norm", "mul-matmul" or None."""
    producer = x.producer()
    if producer is None or {id(u.node) for u in x.uses()} != {id(lin.node) for lin in linears} \
            or x.is_graph_output():
        return None
    if producer.op_type == "RMSNormalization" and producer.domain == "" and _owned_const(producer.inputs[1]):
        return "norm"
    if producer.op_type == "Mul" and _matmul_feeding(producer) is not None:
        return "mul-matmul"
    return None


def fold_input_scale(graph: ir.Graph, x: ir.Value, linears: list[Linear], s: np.ndarray) -> str | None:
    """Rewrite ``x @ W`` as ``(x / s) @ (diag(s) W)`` for every consumer in ``linears``, exact in fp32.

    1/s is folded into the op that produces x: an RMSNormalization's weight ("norm"), or the output
    columns of the MatMul feeding a Mul (the MLP's up projection: silu(g)·u/s = (silu(g)·u)/s).
    Returns how it was folded, or None (and changes nothing) when x's producer cannot absorb it.
    """
    how, producer = fold_target(x, linears), x.producer()
    if how == "norm":
        _set_const(graph, producer, 1, producer.inputs[1].const_value.numpy() / s)
    elif how == "mul-matmul":
        up = _matmul_feeding(producer)
        _set_const(graph, up, 1, up.inputs[1].const_value.numpy() / s[None, :])
    else:
        return None
    for lin in linears:
        _set_const(graph, lin.node, 1, lin.array * s[:, None])
    return how


def _matmul_feeding(mul: ir.Node) -> ir.Node | None:
    for operand in mul.inputs:
        node = operand.producer() if operand is not None else None
        if node is not None and node.op_type == "MatMul" and _float_initializer(node.inputs[1], 2) \
                and len(operand.uses()) == 1 and len(node.inputs[1].uses()) == 1:
            return node
    return None


def _owned_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def _set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` input ``index`` a new constant value (a fresh initializer if the old one is shared)."""
    old = node.inputs[index]
    array = array.astype(np.float32)
    if len(old.uses()) == 1 and old.name in graph.initializers:
        old.const_value = ir.tensor(array, name=old.name)
        return
    node.replace_input_with(index, initializer(graph, f"{old.name}_scaled", array))


def calibration(context: PassContext, pass_name: str):
    """The CalibrationStats left by 'calibrate', or a PassError naming the fix."""
    stats = context.results.calibration
    if stats is None:
        raise PassError(f"{pass_name}: no calibration statistics; put a 'calibrate' pass before it in the recipe")
    return stats


def record_precision(context: PassContext, stats: dict[str, int] | None = None, **fields: str) -> None:
    """Merge ``fields`` (weights=, activations=, kv_cache=, embedding=) into the run's precision note, and
    from the pass's ``stats`` the layers ``keep`` left fp32 and ``promote`` made int8."""
    context.results.precision.update(fields)
    for key, label in (("kept_fp32", "fp32 (keep)"), ("promoted_int8", "int8 (promote)")):
        if stats and stats.get(key):
            context.results.precision[key.split("_")[0] + "_layers"] = f"{stats[key]} {label}"
