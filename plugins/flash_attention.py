"""graphopt::FlashAttention — the op schema and its standard-ONNX reference expansion.

Schema (domain ``graphopt``, version 1)::

    inputs   query  [B,S,H·D]   key, value [B,S,Hkv·D]
             past_key, past_value [B,Hkv,T,D]   (optional, after insert-kv-cache; T = cache capacity)
             cache_lens int32 [B]               (tokens already cached per row)
    outputs  output [B,S,H·D]   present_key, present_value = past, with row b's new K/V written
             at [cache_lens[b], cache_lens[b]+S) — the same buffers when the runtime binds them so
    attrs    num_heads H, kv_num_heads Hkv, scale, causal (1), softcap (0 = none), window (-1 = none)

Query j of row b sits at absolute position cache_lens[b]+j and attends to cache positions
t ≤ cache_lens[b]+j (and t > cache_lens[b]+j-window when window > 0).

The reference expansion uses only standard ops (Attention-23/24, TensorScatter-24); it is what
``--verify`` runs on ONNX Runtime and what the TensorRT lowering emits.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DOMAIN = "graphopt"
OP_TYPE = "FlashAttention"
ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "causal", "softcap", "window")


def is_flash_attention(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def expand_reference(model: ir.Model, keep=lambda node: False) -> int:
    """Replace every FlashAttention node (except those ``keep`` selects) by standard ops, in place; returns how many."""
    count = 0
    for node in list(model.graph):
        if is_flash_attention(node) and not keep(node):
            _expand(model.graph, node)
            count += 1
    if count:
        model.opset_imports[""] = max(model.opset_imports.get("", 23), 24)
        if not any(is_flash_attention(n) for n in model.graph):
            model.opset_imports.pop(DOMAIN, None)
    return count


def _expand(graph: ir.Graph, node: ir.Node) -> None:
    a = {k: v.value for k, v in node.attributes.items()}
    heads, kv_heads = int(a["num_heads"]), int(a["kv_num_heads"])
    query, key, value = node.inputs[:3]
    tape = ir.tape.Tape()
    attention = {"q_num_heads": heads, "kv_num_heads": kv_heads, "scale": float(a["scale"]),
                 "softcap": float(a.get("softcap", 0.0))}
    if len(node.inputs) <= 3:
        window = int(a.get("window", -1))
        if window > 0:
            mask = cache_mask(tape, _zeros_like_batch(tape, query), query, _seq(tape, query), window)
            out = tape.op("Attention", [query, key, value, mask], attributes=attention)
        else:
            out = tape.op("Attention", [query, key, value], attributes={**attention, "is_causal": 1})
        outputs = [out]
    else:
        outputs = _expand_cached(tape, node, attention, int(a.get("window", -1)))
    annotate_dtypes(tape.nodes)
    graph.insert_before(node, tape.nodes)
    for old, new in zip(node.outputs, outputs):
        new.shape = old.shape
        if old.is_graph_output():  # keep the contract's names (present_key.i …)
            name, old.name = old.name, f"{old.name}__expanded"
            new.name = name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _expand_cached(tape: ir.tape.Tape, node: ir.Node, attention: dict, window: int) -> list[ir.Value]:
    query, key, value, past_key, past_value, cache_lens = node.inputs[:6]
    heads, kv_heads = attention["q_num_heads"], attention["kv_num_heads"]
    indices = tape.op("Cast", [cache_lens], attributes={"to": ir.DataType.INT64})
    presents = []
    for new, past in ((key, past_key), (value, past_value)):
        split = tape.op("Reshape", [new, _ints(tape, [0, 0, kv_heads, -1])])
        update = tape.op("Transpose", [split], attributes={"perm": [0, 2, 1, 3]})
        presents.append(tape.op("TensorScatter", [past, update, indices], attributes={"axis": -2}))
    capacity = tape.op("Shape", [past_key], attributes={"start": 2, "end": 3})
    mask = cache_mask(tape, indices, query, capacity, window)
    q4 = tape.op("Transpose", [tape.op("Reshape", [query, _ints(tape, [0, 0, heads, -1])])],
                 attributes={"perm": [0, 2, 1, 3]})
    attention = {k: v for k, v in attention.items() if not k.endswith("num_heads")}
    out4 = tape.op("Attention", [q4, presents[0], presents[1], mask], attributes=attention)
    out3 = tape.op("Reshape", [tape.op("Transpose", [out4], attributes={"perm": [0, 2, 1, 3]}),
                               _ints(tape, [0, 0, -1])])
    return [out3, *presents]


def cache_mask(tape: ir.tape.Tape, start_B: ir.Value, query: ir.Value, capacity: ir.Value, window: int) -> ir.Value:
    """bool [B,1,S,T]: query j of row b (position start[b]+j) may see key t ≤ start[b]+j (and > …-window)."""
    seq = _seq(tape, query)
    zero, one = _ints(tape, 0), _ints(tape, 1)
    q_pos = tape.op("Add", [tape.op("Unsqueeze", [start_B, _ints(tape, [1])]),
                            tape.op("Range", [zero, tape.op("Squeeze", [seq]), one])])  # [B,S]
    q_pos = tape.op("Unsqueeze", [q_pos, _ints(tape, [1, 3])])  # [B,1,S,1]
    k_pos = tape.op("Range", [zero, tape.op("Squeeze", [capacity]), one])  # [T]
    allowed = tape.op("LessOrEqual", [k_pos, q_pos])
    if window > 0:
        lower = tape.op("Sub", [q_pos, _ints(tape, window)])
        allowed = tape.op("And", [allowed, tape.op("Greater", [k_pos, lower])])
    return allowed


_BOOL_OPS = ("LessOrEqual", "Greater", "And")
_INT_OPS = {"Shape": ir.DataType.INT64}
_SAME_AS_FIRST = frozenset("Add Sub Mul Div Neg Cos Sin Exp Sqrt Reciprocal Pow Sigmoid Softmax MatMul Reshape "
                           "Transpose Squeeze Unsqueeze Range Concat Expand Slice Gather Identity TensorScatter "
                           "Attention RotaryEmbedding RMSNormalization ReduceMax ReduceMean ReduceSum".split())


def annotate_dtypes(nodes) -> None:
    """Fill in missing element types (a strongly typed consumer — TensorRT — needs them): simple rules,
    the first input's type for shape-preserving and elementwise ops."""
    for node in nodes:
        out = node.outputs[0]
        if out.dtype is not None or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant":
            out.dtype = node.attributes["value"].value.dtype
        elif node.op_type == "Cast":
            out.dtype = ir.DataType(node.attributes["to"].value)
        elif node.op_type in _BOOL_OPS:
            out.dtype = ir.DataType.BOOL
        elif node.op_type in _INT_OPS:
            out.dtype = _INT_OPS[node.op_type]
        elif node.op_type == "ConstantOfShape":
            out.dtype = node.attributes["value"].value.dtype
        elif node.op_type in _SAME_AS_FIRST and node.inputs and node.inputs[0] is not None:
            out.dtype = node.inputs[0].dtype


def _seq(tape: ir.tape.Tape, query: ir.Value) -> ir.Value:
    return tape.op("Shape", [query], attributes={"start": 1, "end": 2})


def _zeros_like_batch(tape: ir.tape.Tape, query: ir.Value) -> ir.Value:
    batch = tape.op("Shape", [query], attributes={"start": 0, "end": 1})
    return tape.op("ConstantOfShape", [batch], attributes={"value": ir.tensor(np.array([0], np.int64))})


def _ints(tape: ir.tape.Tape, values) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))})
