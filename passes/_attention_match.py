"""Recognise attention by what it computes, for fuse-attention.

Two forms of the traced graph, each matched back to q, k, v, the scale, the mask and the extras:

(a) the opset-23 ``Attention`` op (SDPA export), K/V expanded to all heads by ``repeat_kv``;
(b) the decomposed (eager) form, in any of these variants::

      s = MatMul(q4·c, Kᵀ·c)            Kᵀ = Transpose(k4, [0,1,3,2]) or Transpose(Reshape(k3), [0,2,3,1])
      s = s ·scale | /scale             (scalar Mul/Div, any number)
      s = cap · Tanh(s / cap)           logit softcapping (Gemma 2)
      s = s + mask | Where(mask, s, -inf)
      s = Concat(s, sinks[1,H,1,1]→[B,H,S,1]) ; s − ReduceMax(s)      attention sinks (gpt-oss)
      p = Softmax(s) [→ Slice(p, :S) with sinks] ; o4 = MatMul(p, v4)

A Softmax whose input is not rank 4 ([B,H,S,T]) is not attention (a mixture-of-experts router):
the matchers return None for it. Any other mismatch returns the reason as a string.
Legend: B batch, S seq, H query heads, Hkv kv heads, D head dim, T keys; x3 [B,S,H·D], x4 [B,H,S,D].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from graphopt.passes._edit import attr, const_array, only_consumer, perm_is, producer, scalar, static_dim

UNFUSED_KEY = "graphopt.unfused"  # node metadata: why fuse-attention left this attention alone


@dataclasses.dataclass
class AttentionMatch:
    anchor: ir.Node
    query: ir.Value
    key: ir.Value
    value: ir.Value
    output: ir.Value
    scale: float
    mask: ir.Value | None
    additive: bool
    softcap: float = 0.0
    window: int = -1  # sliding window in keys (-1: none), read from the mask
    key3: ir.Value | None = None  # the key as [B,S,Hkv·D] when the match already found it
    sinks: ir.Value | None = None  # per-head sink logits, any shape holding H values


def looks_like_attention(node: ir.Node) -> bool:
    """An Attention op, or a Softmax over rank-4 scores: what must be fused before the cache goes in."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Attention":
        return True
    scores = node.inputs[0] if node.op_type == "Softmax" and node.inputs else None
    return scores is not None and scores.shape is not None and len(scores.shape) == 4


def module_of(node: ir.Node) -> str:
    """The module the exporter recorded for ``node`` (e.g. model.layers.3.self_attn), for messages."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
    names = [s.strip(" '\"") for s in scopes.strip("[]").split(",")]
    module = names[-2] if len(names) >= 2 else ""
    return module.removeprefix("model.") or "unknown layer"  # graphopt's trace wraps the model as 'model'


def match_attention_op(node: ir.Node) -> AttentionMatch | str:
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    query, key, value, mask = inputs[:4]
    if any(v is not None for v in inputs[4:]):
        return "has past_key/past_value inputs (already cached)"
    if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
        return "uses present/qk outputs"
    if attr(node, "qk_matmul_output_mode", 0) != 0:
        return "qk_matmul_output_mode is not 0"
    causal = attr(node, "is_causal", 0) == 1
    if causal and mask is not None:
        return "is_causal together with an explicit mask"
    if not causal and mask is None:
        return "no mask and is_causal=0: bidirectional attention"
    head_dim = static_dim(query, -1)
    scale = attr(node, "scale", None)
    if scale is None and head_dim:
        scale = 1.0 / float(np.sqrt(head_dim))
    is_bool = mask is not None and mask.dtype == ir.DataType.BOOL
    return AttentionMatch(node, query, strip_repeat_kv(key), strip_repeat_kv(value), node.outputs[0],
                          float(scale or 0.0), mask, additive=not is_bool, softcap=float(attr(node, "softcap", 0.0)))


def match_decomposed(softmax: ir.Node) -> AttentionMatch | str | None:
    if not looks_like_attention(softmax):
        return None
    if attr(softmax, "axis", -1) not in (-1, 3):
        return "softmax is not over the last axis"
    scores, sinks = _strip_sinks(softmax.inputs[0])
    probs = softmax.outputs[0]
    if sinks is not None:
        probs = _sliced_off_sink(probs)
        if probs is None:
            return "softmax over [scores, sinks] is not followed by a Slice dropping the sink column"
    scores, mask, additive = _strip_mask(scores)
    softcap, scores = _strip_softcap(scores)
    found = _scores(scores)
    if isinstance(found, str):
        return found
    scale, query, key_t = found
    transpose = producer(key_t, "Transpose")
    key3 = _merged_transpose_source(transpose)
    if not perm_is(transpose, (0, 1, 3, 2)) and key3 is None:
        return "scores MatMul's second input is not Transpose(key, perm=[0,1,3,2])"
    pv = only_consumer(probs)
    if pv is None or pv.op_type != "MatMul" or pv.inputs[0] is not probs:
        return "softmax output does not feed a single MatMul with the values"
    if mask is None:
        return "no mask: bidirectional attention"
    return AttentionMatch(pv, query, strip_repeat_kv(transpose.inputs[0]), strip_repeat_kv(pv.inputs[1]),
                          pv.outputs[0], scale, mask, additive, softcap=softcap, key3=key3, sinks=sinks)


def _strip_mask(scores: ir.Value) -> tuple[ir.Value, ir.Value | None, bool]:
    add, where = producer(scores, "Add"), producer(scores, "Where")
    if add is not None:
        side = 0 if not isinstance(_scores(_strip_softcap(add.inputs[0])[1]), str) else 1
        return add.inputs[side], add.inputs[1 - side], True
    if where is not None and (scalar(where.inputs[2]) or 0.0) < -1e4:
        return where.inputs[1], where.inputs[0], False
    return scores, None, True


def _strip_softcap(scores: ir.Value) -> tuple[float, ir.Value]:
    """cap · Tanh(x / cap) (or x · (1/cap)) → (cap, x); (0, scores) when absent."""
    outer = producer(scores, "Mul")
    tanh = producer(outer.inputs[0], "Tanh") if outer is not None else None
    cap = scalar(outer.inputs[1]) if outer is not None else None
    if tanh is None or not cap:
        return 0.0, scores
    inner = producer(tanh.inputs[0], "Div") or producer(tanh.inputs[0], "Mul")
    factor = scalar(inner.inputs[1]) if inner is not None else None
    if factor is None or not np.isclose(factor if inner.op_type == "Div" else 1.0 / factor, cap, rtol=1e-6):
        return 0.0, scores
    return float(cap), inner.inputs[0]


def _strip_sinks(scores: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """Concat(s, Expand(sinks)) on the last axis, optionally minus its ReduceMax → (s, sinks)."""
    sub = producer(scores, "Sub")
    if sub is not None and producer(sub.inputs[1], "ReduceMax") is not None:
        scores = sub.inputs[0]
    concat = producer(scores, "Concat")
    if concat is None or len(concat.inputs) != 2 or attr(concat, "axis", 0) not in (-1, 3):
        return scores, None
    expand = producer(concat.inputs[1], "Expand")
    if expand is None:
        return scores, None
    return concat.inputs[0], expand.inputs[0]


def _sliced_off_sink(probs: ir.Value) -> ir.Value | None:
    """The Slice(probs, 0:-1 or 0:S, last axis) that drops the sink column."""
    node = only_consumer(probs)
    if node is None or node.op_type != "Slice":
        return None
    starts, axes = const_array(node.inputs[1]), const_array(node.inputs[3]) if len(node.inputs) > 3 else None
    if starts is None or starts.reshape(-1).tolist() != [0] or axes is None or axes.reshape(-1)[0] not in (-1, 3):
        return None
    return node.outputs[0]


def _merged_transpose_source(transpose: ir.Node | None) -> ir.Value | None:
    """Kᵀ as one Transpose(perm=[0,2,3,1]) of Reshape(k3 → [B,S,H,D]) (split and swap folded): k3."""
    if not perm_is(transpose, (0, 2, 3, 1)):
        return None
    reshape = producer(transpose.inputs[0], "Reshape")
    source = reshape.inputs[0] if reshape is not None else None
    return source if source is not None and source.shape is not None and len(source.shape) == 3 else None


def _scores(value: ir.Value | None) -> tuple[float, ir.Value, ir.Value] | str:
    """Walk back over scalar Mul/Div to the Q·Kᵀ MatMul; fold scalar scales on Q and Kᵀ too."""
    scale = 1.0
    node = value.producer() if value is not None else None
    while node is not None and node.op_type in ("Mul", "Div") and scalar(node.inputs[1]) is not None:
        factor = scalar(node.inputs[1])
        scale *= factor if node.op_type == "Mul" else 1.0 / factor
        node = node.inputs[0].producer()
    if node is None or node.op_type != "MatMul":
        return "softmax input is not a (scaled) MatMul of query and key"
    query, key_t = node.inputs
    for side in ("q", "k"):
        operand = query if side == "q" else key_t
        mul = producer(operand, "Mul")
        if mul is not None and scalar(mul.inputs[1]) is not None:
            scale *= scalar(mul.inputs[1])
            query, key_t = (mul.inputs[0], key_t) if side == "q" else (query, mul.inputs[0])
    if query.shape is None or len(query.shape) != 4:
        return "query is not rank 4 [B,H,S,D]"
    return scale, query, key_t


def strip_repeat_kv(value: ir.Value) -> ir.Value:
    """Reshape(Expand(Unsqueeze(x, axes=[2]))) — transformers' repeat_kv — back to x."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand else None
    if unsqueeze is not None:
        axes = const_array(unsqueeze.inputs[1])
        if axes is not None and axes.reshape(-1).tolist() == [2]:
            return unsqueeze.inputs[0]
    return value
