"""fuse-attention: every attention becomes one ``graphopt::FlashAttention`` with native GQA.

Attention is recognised by what it computes (passes/_attention_match.py), in two forms:

(a) the opset-23 ``Attention`` op, with K/V expanded to all query heads by ``repeat_kv``::

     q3 ─Reshape─[QK-norm]─Transpose─RoPE ─────────────────────────┐
     k3 ─Reshape─[QK-norm]─Transpose─RoPE─Unsqueeze─Expand─Reshape ┤ Attention ─Transpose─Reshape─► o3
     v3 ─Reshape─Transpose─────────────────Unsqueeze─Expand─Reshape ┤
     mask subgraph (position_ids → bool [B,1,S,S]) ────────────────┘

(b) the decomposed form (eager attention: GPT-2, Gemma 2's softcap, gpt-oss's sinks)::

     MatMul(q4·c, Kᵀ·c) ─scale─[cap·tanh(·/cap)]─mask─[Concat sinks, −max]─Softmax─[Slice]─MatMul(·, v4)

   after, both::

     q3 ─[QK-norm]─RoPE(3D)─┐
     k3 ─[QK-norm]─RoPE(3D)─┤ graphopt::FlashAttention(num_heads=H, kv_num_heads=Hkv, scale, causal=1,
     v3 ────────────────────┤                           softcap, window) ─► o3
     [sinks [H]] ───────────┘ (input 6)   the mask subgraph is left dead for dead-code removal

A per-head norm between the head split and the transpose ([B,S,H,D], QK-norm) stays where it is and
is merged back to [B,S,H·D] by a free Reshape. RoPE in any layout (RotaryEmbedding with partial
``rotary_embedding_dim`` or interleaved, or decomposed Mul/Split/Concat) stays outside the op.
Legend: B batch, S seq, H query heads, Hkv kv heads, D head dim; x3 = [B,S,H·D], x4 = [B,H,S,D].

Each mask is read by running its subgraph (passes/_mask.py): causal, or causal with a sliding
window whose size is read per layer (Gemma 2/3 and gpt-oss alternate windowed and global layers).
The ``window`` option, when > 0, requires that window on every layer. Anything not fused is
reported with the module it belongs to and the reason, in ``notes`` and on the node (for the
insert-kv-cache guard). Statistics: fused_attention_op / fused_decomposed, unfused, and the layers
with sliding_window (and the largest ``window``), softcap, sinks, qk_norm.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from graphopt.passes._attention_match import UNFUSED_KEY, AttentionMatch, match_attention_op, match_decomposed, module_of
from graphopt.passes._edit import only_consumer, perm_is, producer, static_dim
from graphopt.passes._mask import mask_window
from graphopt.passes.base import GRAPHOPT_DOMAIN, GraphoptPass
from graphopt.plugins.flash_attention import annotate_dtypes


class FuseAttentionPass(GraphoptPass):
    """Fuse attention into graphopt::FlashAttention.

    Options:
        window: a sliding window every layer must have; -1 (default) reads each layer's window from
            its mask (the model metadata's window, when present, sets the probe length).
    """

    name = "fuse-attention"

    def __init__(self, window: int = -1) -> None:
        super().__init__()
        self.window = window

    def _count_features(self, match: AttentionMatch) -> None:
        for kind in _kinds(match):
            self.count(kind)
        if match.window > 0:
            self.stats["window"] = max(self.stats.get("window", 0), match.window)
        if match.softcap > 0:
            self.stats["softcap_value"] = int(round(match.softcap))

    def _with_window(self, graph: ir.Graph, found: AttentionMatch, hint: int, seen: dict) -> AttentionMatch | str:
        """``found`` with the window its mask allows, or why it cannot fuse. A mask is read (run on ORT) once:
        layers share it (SmolLM2's 30 layers have one mask; alternating models have two)."""
        key = (id(found.mask), found.additive)
        if key not in seen:
            seen[key] = mask_window(graph, found.mask, found.additive, hint)
        window = seen[key]
        if isinstance(window, int) and self.window > 0 and window != self.window:
            window = f"mask has window {window}, the window option says {self.window}"
        return window if isinstance(window, str) else dataclasses.replace(found, window=window)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        hint = self.window if self.window > 0 else int(model.metadata_props.get("graphopt.sliding_window", -1) or -1)
        modified, windows = False, {}
        for node in list(graph):
            if node.graph is None:
                continue
            if node.op_type == "Attention" and node.domain == "":
                found = match_attention_op(node)
            elif node.op_type == "Softmax" and node.domain == "":
                found = match_decomposed(node)
            else:
                continue
            if found is None:  # a Softmax that is not attention (a mixture-of-experts router)
                continue
            if isinstance(found, AttentionMatch) and found.mask is not None:
                found = self._with_window(graph, found, hint, windows)
            if isinstance(found, str):
                self.count("unfused")
                node.metadata_props[UNFUSED_KEY] = found
                self.note(f"{node.op_type} node {node.name!r} ({module_of(node)}) not fused: {found}")
                continue
            form = "attention_op" if node.op_type == "Attention" else "decomposed"
            self.count(f"fused_{form}")
            self._count_features(found)
            _rewrite(graph, found)
            modified = True
        if modified:
            model.opset_imports.setdefault(GRAPHOPT_DOMAIN, 1)
            RemoveUnusedNodesPass()(model)  # the replaced attention and its mask subgraph
        return ir.passes.PassResult(model, modified)


def _kinds(match: AttentionMatch) -> list[str]:
    """Which features of this layer's attention the counters record (the build report's features)."""
    kinds = ["sliding_window"] if match.window > 0 else []
    kinds += ["softcap"] if match.softcap > 0 else []
    kinds += ["sinks"] if match.sinks is not None else []
    kinds += ["qk_norm"] if _has_head_norm(match.query) and _has_head_norm(match.key) else []
    return kinds


def _has_head_norm(x4: ir.Value) -> bool:
    """A norm on q or k before RoPE: per head over D (Qwen3, Gemma 3) or over the whole projection
    before the head split (OLMo2) — QK-norm either way."""
    rope = producer(x4, "RotaryEmbedding")
    x4 = rope.inputs[0] if rope is not None else x4
    if x4.producer() is not None and x4.producer().op_type in _NORMS:  # the norm after the transpose (Gemma 3)
        return True
    transpose = producer(x4, "Transpose")
    inner = transpose.inputs[0].producer() if transpose is not None else None
    if inner is not None and inner.op_type == "Reshape":
        inner = inner.inputs[0].producer()
    return inner is not None and inner.op_type in _NORMS


_NORMS = ("RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization")


def _rewrite(graph: ir.Graph, match: AttentionMatch) -> None:
    heads, head_dim = static_dim(match.query, 1), static_dim(match.query, 3)
    tape = ir.tape.Tape()
    query = _to_3d(tape, match.query, heads, head_dim)
    if match.key3 is not None:
        key, kv_heads = match.key3, match.key3.shape[-1] // head_dim
    else:
        kv_heads = static_dim(match.key, 1)
        key = _to_3d(tape, match.key, kv_heads, head_dim)
    value = _to_3d(tape, match.value, kv_heads, head_dim)
    inputs = [query, key, value]
    if match.sinks is not None:  # optional input 6 (after past_key, past_value, cache_lens)
        inputs += [None, None, None, tape.op("Reshape", [match.sinks, _ints(tape, [heads])])]
    output = tape.op(
        "FlashAttention", inputs, domain=GRAPHOPT_DOMAIN,
        attributes={"num_heads": heads, "kv_num_heads": kv_heads, "scale": match.scale, "causal": 1,
                    "softcap": match.softcap, "window": match.window},
    )
    output.shape = ir.Shape([*match.query.shape[:1], match.query.shape[2], heads * head_dim])
    output.dtype = match.query.dtype
    reshape = _merge_heads_consumer(match.output)
    if reshape is None:
        split = tape.op("Reshape", [output, _ints(tape, [0, 0, heads, head_dim])])
        output = tape.op("Transpose", [split], attributes={"perm": [0, 2, 1, 3]})
        target = match.output
    else:
        target = reshape.outputs[0]
    annotate_dtypes(tape.nodes)
    graph.insert_before(match.anchor, tape.nodes)
    target.replace_all_uses_with(output, replace_graph_outputs=True)


def _merge_heads_consumer(out4: ir.Value) -> ir.Node | None:
    """The Reshape in out4 ─Transpose(0,2,1,3)─Reshape→[B,S,H·D], when that is the only use."""
    transpose = only_consumer(out4)
    if not perm_is(transpose, (0, 2, 1, 3)):
        return None
    reshape = only_consumer(transpose.outputs[0])
    if reshape is None or reshape.op_type != "Reshape":
        return None
    shape = reshape.outputs[0].shape
    return reshape if shape is not None and len(shape) == 3 else None


def _to_3d(tape: ir.tape.Tape, x4: ir.Value, heads: int, head_dim: int) -> ir.Value:
    """[B,H,S,D] → [B,S,H·D], reusing the projection output when x4 = Transpose(Reshape(x3)).

    A RoPE between the split and the attention moves to the 3D side (RotaryEmbedding takes
    [B,S,H·D] with ``num_heads``); a per-head norm before the Transpose (QK-norm, [B,S,H,D]) is
    kept and merged back with a free Reshape instead of a Transpose.
    """
    found = _heads_last(tape, x4, heads, head_dim)
    if found is not None:
        return found
    rope = producer(x4, "RotaryEmbedding")
    if rope is not None and (len(rope.inputs) < 4 or rope.inputs[3] is None):
        inner = _heads_last(tape, rope.inputs[0], heads, head_dim) or _norm_heads_last(tape, rope.inputs[0], heads,
                                                                                       head_dim)
        if inner is not None:
            attributes = {k: a.value for k, a in rope.attributes.items()}
            attributes["num_heads"] = heads
            out = tape.op("RotaryEmbedding", [inner, rope.inputs[1], rope.inputs[2]], attributes=attributes)
            out.shape, out.dtype = inner.shape, inner.dtype
            return out
    transposed = tape.op("Transpose", [x4], attributes={"perm": [0, 2, 1, 3]})
    return _merge_last_two(tape, transposed, x4, heads, head_dim)


def _norm_heads_last(tape: ir.tape.Tape, x4: ir.Value, heads: int, head_dim: int) -> ir.Value | None:
    """x4 = Norm_D(Transpose(y, [0,2,1,3])) (Gemma 3's QK-norm after the transpose): the same norm over D
    on y [B,S,H,D] (it commutes with the transpose), merged to [B,S,H·D] by a free Reshape."""
    norm = x4.producer()
    if norm is None or norm.op_type not in _NORMS or norm.domain not in ("", "ai.onnx") or \
            norm.attributes.get("axis") is None or norm.attributes["axis"].value != -1:
        return None
    transpose = producer(norm.inputs[0], "Transpose")
    if not perm_is(transpose, (0, 2, 1, 3)) or len(norm.outputs[0].uses()) != 1:
        return None
    attributes = {k: a.value for k, a in norm.attributes.items()}
    moved = tape.op(norm.op_type, [transpose.inputs[0], *norm.inputs[1:]], attributes=attributes)
    moved.shape, moved.dtype = transpose.inputs[0].shape, x4.dtype
    return _merge_last_two(tape, moved, x4, heads, head_dim)


def _heads_last(tape: ir.tape.Tape, x4: ir.Value, heads: int, head_dim: int) -> ir.Value | None:
    """x4 = Transpose(y, perm=[0,2,1,3]) with y [B,S,H,D]: y's 3D source, or y merged by a Reshape."""
    transpose = producer(x4, "Transpose")
    if not perm_is(transpose, (0, 2, 1, 3)):
        return None
    found = _split_heads_source(x4)
    if found is not None:
        return found
    return _merge_last_two(tape, transpose.inputs[0], x4, heads, head_dim)


def _merge_last_two(tape: ir.tape.Tape, bshd: ir.Value, x4: ir.Value, heads: int, head_dim: int) -> ir.Value:
    out = tape.op("Reshape", [bshd, _ints(tape, [0, 0, heads * head_dim])])
    if x4.shape is not None and len(x4.shape) == 4:
        out.shape = ir.Shape([x4.shape[0], x4.shape[2], heads * head_dim])
    out.dtype = x4.dtype
    return out


def _split_heads_source(x4: ir.Value) -> ir.Value | None:
    transpose = producer(x4, "Transpose")
    if not perm_is(transpose, (0, 2, 1, 3)):
        return None
    reshape = producer(transpose.inputs[0], "Reshape")
    if reshape is None:
        return None
    source = reshape.inputs[0]
    return source if source.shape is not None and len(source.shape) == 3 else None


def _ints(tape: ir.tape.Tape, values: list[int]) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))})
