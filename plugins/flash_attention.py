"""graphopt::FlashAttention — the op schema and its standard-ONNX reference expansion.

Schema (domain ``graphopt``, version 1)::

    inputs   0 query  [B,S,H·D]   1 key, 2 value [B,S,Hkv·D]
             3 past_key, 4 past_value [B,Hkv,T,D]   (optional, after insert-kv-cache; T = cache capacity)
             5 cache_lens int32 [B]                 (tokens already cached per row)
             6 sinks [H]                            (optional: per-head sink logits, gpt-oss)
    outputs  output [B,S,H·D]   present_key, present_value = past, with row b's new K/V written
             at [cache_lens[b], cache_lens[b]+S) — the same buffers when the runtime binds them so
    attrs    num_heads H, kv_num_heads Hkv, scale, causal (1), softcap (0 = none), window (-1 = none)

What it computes, for query j of row b at absolute position p = cache_lens[b]+j and head h
(kv head h // (H/Hkv))::

    s_t  = scale · q·k_t                       t ≤ p (and t > p − window when window > 0)
    s_t  = softcap · tanh(s_t / softcap)       when softcap > 0 (Gemma 2)
    w    = softmax([s_0 … s_p, sinks[h]])      the sink takes probability mass, adds no value
    out  = Σ_t w_t · v_t                       (the sink's weight is dropped)

The reference expansion uses only standard ops (Attention-23/24, TensorScatter-24; with sinks,
MatMul/Softmax over [B,Hkv,G,S,T] groups); it is what ``--verify`` runs on ONNX Runtime and what
the TensorRT lowering emits.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import GraphoptError

DOMAIN = "graphopt"
OP_TYPE = "FlashAttention"
ATTRIBUTES = ("num_heads", "kv_num_heads", "scale", "causal", "softcap", "window")


def is_flash_attention(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def has_cache(node: ir.Node) -> bool:
    """True once insert-kv-cache gave the node past_key/past_value/cache_lens (inputs 3–5)."""
    return len(node.inputs) >= 6 and node.inputs[3] is not None


def expand_reference(model: ir.Model, keep=lambda node: False, softcap_in_attention: bool = True) -> int:
    """Replace every FlashAttention node (except those ``keep`` selects) by standard ops, in place; returns how many.

    ``softcap_in_attention`` False writes softcapped attention as MatMul/Tanh/Softmax (TensorRT refuses
    Attention's softcap attribute)."""
    count = 0
    for node in list(model.graph):
        if is_flash_attention(node) and not keep(node):
            _expand(model.graph, node, softcap_in_attention)
            count += 1
    if count:
        model.opset_imports[""] = max(model.opset_imports.get("", 23), 24)
        if not any(is_flash_attention(n) for n in model.graph):
            model.opset_imports.pop(DOMAIN, None)
    return count


def _expand(graph: ir.Graph, node: ir.Node, softcap_in_attention: bool = True) -> None:
    a = {k: v.value for k, v in node.attributes.items()}
    heads, kv_heads = int(a["num_heads"]), int(a["kv_num_heads"])
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    query, key, value, sinks = inputs[0], inputs[1], inputs[2], inputs[6]
    tape = ir.tape.Tape()
    attention = {"q_num_heads": heads, "kv_num_heads": kv_heads, "scale": float(a["scale"]),
                 "softcap": float(a.get("softcap", 0.0))}
    window = int(a.get("window", -1))
    decompose = sinks is not None or (attention["softcap"] > 0 and not softcap_in_attention)
    if inputs[3] is None and not decompose:
        if window > 0:
            mask = cache_mask(tape, _zeros_like_batch(tape, query), query, _seq(tape, query), window)
            out = tape.op("Attention", [query, key, value, mask], attributes=attention)
        else:
            out = tape.op("Attention", [query, key, value], attributes={**attention, "is_causal": 1})
        outputs = [out]
    else:
        outputs = _expand_general(tape, inputs, attention, window, decompose)
    annotate_dtypes(tape.nodes)
    graph.insert_before(node, tape.nodes)
    for old, new in zip(node.outputs, outputs):
        new.shape = old.shape
        if old.is_graph_output():  # keep the contract's names (present_key.i …)
            name, old.name = old.name, f"{old.name}__expanded"
            new.name = name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def _expand_general(tape: ir.tape.Tape, inputs: list, attention: dict, window: int, decompose: bool) -> list[ir.Value]:
    """With a cache (TensorScatter of the new K/V at cache_lens, mask over the capacity) and/or decomposed."""
    query, key, value, past_key, past_value, cache_lens, sinks = inputs[:7]
    heads, kv_heads = attention["q_num_heads"], attention["kv_num_heads"]
    new4 = [tape.op("Transpose", [tape.op("Reshape", [new, _ints(tape, [0, 0, kv_heads, -1])])],
                    attributes={"perm": [0, 2, 1, 3]}) for new in (key, value)]
    if past_key is not None:
        start = tape.op("Cast", [cache_lens], attributes={"to": ir.DataType.INT64})
        presents = [tape.op("TensorScatter", [past, update, start], attributes={"axis": -2})
                    for past, update in zip((past_key, past_value), new4)]
        capacity = tape.op("Shape", [past_key], attributes={"start": 2, "end": 3})
    else:
        start, presents, capacity = _zeros_like_batch(tape, query), new4, _seq(tape, query)
    mask = cache_mask(tape, start, query, capacity, window)
    q4 = tape.op("Transpose", [tape.op("Reshape", [query, _ints(tape, [0, 0, heads, -1])])],
                 attributes={"perm": [0, 2, 1, 3]})
    if not decompose:
        plain = {k: v for k, v in attention.items() if not k.endswith("num_heads")}
        out4 = tape.op("Attention", [q4, presents[0], presents[1], mask], attributes=plain)
    else:
        width = query.shape[-1] if query.shape is not None else None
        if not isinstance(width, int):
            raise GraphoptError("decomposed FlashAttention (sinks, softcap on trt) needs a static query width [B,S,H·D]; run 'cleanup' "
                                "(shape inference) before expanding it")
        out4 = decomposed_attention(tape, q4, presents, mask, sinks, {**attention, "head_dim": width // heads})
    out3 = tape.op("Reshape", [tape.op("Transpose", [out4], attributes={"perm": [0, 2, 1, 3]}),
                               _ints(tape, [0, 0, -1])])
    return [out3, *presents] if past_key is not None else [out3]


def decomposed_attention(tape: ir.tape.Tape, q4: ir.Value, kv4: list[ir.Value], mask: ir.Value,
                         sinks: ir.Value | None, attention: dict) -> ir.Value:
    """softmax([q·kᵀ·scale (softcapped, masked), sink_h]) without the sink column, times v — grouped as
    [B,Hkv,G,S,·] so the kv heads are never copied (G = H / Hkv query heads per kv head)."""
    heads, kv_heads = attention["q_num_heads"], attention["kv_num_heads"]
    group, head_dim = heads // kv_heads, attention["head_dim"]
    q5 = tape.op("Reshape", [q4, _ints(tape, [0, kv_heads, group, -1, head_dim])])
    k5t = tape.op("Transpose", [tape.op("Unsqueeze", [kv4[0], _ints(tape, [2])])], attributes={"perm": [0, 1, 2, 4, 3]})
    scores = tape.op("Mul", [tape.op("MatMul", [q5, k5t]), _floats(tape, attention["scale"])])
    cap = attention["softcap"]
    if cap > 0:
        scores = tape.op("Mul", [tape.op("Tanh", [tape.op("Div", [scores, _floats(tape, cap)])]), _floats(tape, cap)])
    masked = tape.op("Where", [tape.op("Unsqueeze", [mask, _ints(tape, [1])]), scores, _floats(tape, -3.0e38)])
    if sinks is None:
        probs = tape.op("Softmax", [masked], attributes={"axis": -1})
    else:
        shape = tape.op("Shape", [masked], attributes={"start": 0, "end": 4})
        sink5 = tape.op("Expand", [tape.op("Reshape", [sinks, _ints(tape, [1, kv_heads, group, 1, 1])]),
                                   tape.op("Concat", [shape, _ints(tape, [1])], attributes={"axis": 0})])
        probs = tape.op("Softmax", [tape.op("Concat", [masked, sink5], attributes={"axis": -1})],
                        attributes={"axis": -1})
        keys = tape.op("Shape", [masked], attributes={"start": 4, "end": 5})
        probs = tape.op("Slice", [probs, _ints(tape, [0]), keys, _ints(tape, [-1])])
    out5 = tape.op("MatMul", [probs, tape.op("Unsqueeze", [kv4[1], _ints(tape, [2])])])
    return tape.op("Reshape", [out5, _ints(tape, [0, heads, -1, head_dim])])


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
                           "Transpose Squeeze Unsqueeze Tanh Range Concat Expand Slice Gather Identity TensorScatter "
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
        elif node.op_type == "Where":
            out.dtype = node.inputs[1].dtype
        elif node.op_type in _SAME_AS_FIRST and node.inputs and node.inputs[0] is not None:
            out.dtype = node.inputs[0].dtype


def _seq(tape: ir.tape.Tape, query: ir.Value) -> ir.Value:
    return tape.op("Shape", [query], attributes={"start": 1, "end": 2})


def _zeros_like_batch(tape: ir.tape.Tape, query: ir.Value) -> ir.Value:
    batch = tape.op("Shape", [query], attributes={"start": 0, "end": 1})
    return tape.op("ConstantOfShape", [batch], attributes={"value": ir.tensor(np.array([0], np.int64))})


def _floats(tape: ir.tape.Tape, value: float) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(value, np.float32))})


def _ints(tape: ir.tape.Tape, values) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))})
