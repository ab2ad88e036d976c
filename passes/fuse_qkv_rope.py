"""fuse-qkv-rope: one packed q/k/v projection and RoPE inside GroupQueryAttention (ONNX Runtime CPU).

    before:  x ─MatMulNBits(Wq)─RotaryEmbedding(cos, sin)─┐
             x ─MatMulNBits(Wk)─RotaryEmbedding(cos, sin)─┼─► GroupQueryAttention(q, k, v, past_k, past_v, …)
             x ─MatMulNBits(Wv)───────────────────────────┘
             cos, sin = Cos/Sin(position_ids · inv_freq)                    [B,S,D/2]
    after:   x ─MatMulNBits([Wq|Wk|Wv])─► GroupQueryAttention(qkv, –, –, past_k, past_v, …,
                                           cos_cache, sin_cache, position_ids)   do_rotary = 1
             cos_cache, sin_cache = cos/sin(arange(P) ⊗ inv_freq)           [P,D/2] constants
    A projection written by 'keep-quant' as Add(MatMulNBits(x, W), MatMul(sums, O)) (its block-minimum
    correction) packs the same way: one MatMulNBits([Wq|Wk|Wv]) + one MatMul(sums, [Oq|Ok|Ov]) + one Add.

Per layer this removes two projection calls and two RoPE calls (4 of ~15 nodes): on a CPU a
batch-1 decode step is dominated by per-node overhead of small kernels. Plain fp32 ``MatMul``
projections are packed the same way (weights concatenated on N). RoPE is taken at the explicit
``position_ids`` (GQA's position_ids input), so the I/O contract is unchanged. Runs after
'lower-ort-cpu' (and 'lower-quant-ort-cpu'). Letters: B batch, S seq, D head dim, P positions.

Options: ``max_positions`` rows of the cos/sin tables (ORT refuses positions beyond them); 0 (default)
takes the model's context length from the build (PassContext.max_positions), else 8192.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes._edit import attr, const_array, initializer, only_consumer
from graphopt.passes.base import GraphoptPass

MS_DOMAIN = "com.microsoft"
_NBITS_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _projections(x_q: ir.Value, x_k: ir.Value, x_v: ir.Value) -> tuple[list[ir.Node], list[ir.Node]] | str:
    """The three projection nodes (and their block-minimum corrections, see 'keep-quant') when they can be
    packed, else the reason they cannot."""
    nodes = [x.producer() for x in (x_q, x_k, x_v)]
    if all(n is not None and n.op_type == "Add" for n in nodes):  # keep-quant: projection + correction
        adds, nodes = nodes, [n.inputs[0].producer() for n in nodes]
        corrections = [n.inputs[1].producer() for n in adds]
        if any(c is None or c.op_type != "MatMul" or const_array(c.inputs[1]) is None for c in corrections) \
                or len({id(c.inputs[0]) for c in corrections}) != 1 \
                or any(only_consumer(v) is None for n in (*nodes, *corrections) for v in n.outputs):
            return "q/k/v Adds are not projection + block-minimum correction pairs"
        reason = _packable(nodes)
        return reason if isinstance(reason, str) else (adds + nodes, corrections)
    reason = _packable(nodes)
    return reason if isinstance(reason, str) else (nodes, [])


def _packable(nodes: list[ir.Node | None]) -> list[ir.Node] | str:
    if any(n is None or n.op_type not in ("MatMulNBits", "MatMul") for n in nodes):
        return "q/k/v are not MatMul/MatMulNBits outputs"
    if len({n.op_type for n in nodes}) != 1 or len({id(n.inputs[0]) for n in nodes}) != 1:
        return "q/k/v projections differ in kind or input"
    if any(only_consumer(n.outputs[0]) is None for n in nodes):
        return "a projection output has other readers"
    if nodes[0].op_type == "MatMul":
        return nodes if all(const_array(n.inputs[1]) is not None for n in nodes) else "weights are not constant"
    if any(len(n.inputs) != 3 or const_array(n.inputs[1]) is None for n in nodes):
        return "MatMulNBits with zero points, bias or non-constant weights"
    if len({tuple(attr(n, a) for a in _NBITS_ATTRS) for n in nodes}) != 1:
        return "MatMulNBits attributes differ"
    return nodes


def _inv_freq(rope: ir.Node) -> np.ndarray | str:
    """inv_freq [D/2] from cos = Cos(Mul(positions, inv_freq)), sin = Sin(same)."""
    cos, sin = _producer(rope.inputs[1], "Cos"), _producer(rope.inputs[2], "Sin")
    if cos is None or sin is None or cos.inputs[0] is not sin.inputs[0]:
        return "cos/sin are not Cos/Sin of one angle tensor (scaled RoPE?)"
    mul = _producer(cos.inputs[0], "Mul")
    constants = [const_array(v) for v in mul.inputs] if mul is not None else []
    freq = next((c for c in constants if c is not None and c.ndim == 1), None)
    return freq.astype(np.float64) if freq is not None else "angles are not positions · inv_freq"


class FuseQkvRopePass(GraphoptPass):
    """Pack q/k/v projections into one MatMul(NBits) and move RoPE into GroupQueryAttention."""

    name = "fuse-qkv-rope"

    def __init__(self, max_positions: int = 0) -> None:
        super().__init__()
        self.max_positions = max_positions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        positions = next((v for v in graph.inputs if v.name == "position_ids"), None)
        for gqa in [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]:
            reason = self._fuse(graph, gqa, positions)
            if reason is not None:
                self.note(f"fuse-qkv-rope: {gqa.name!r} kept: {reason}")
        return ir.passes.PassResult(model, bool(self.stats))

    def _fuse(self, graph: ir.Graph, gqa: ir.Node, positions: ir.Value | None) -> str | None:
        if positions is None or attr(gqa, "do_rotary", 0) or len(gqa.inputs) != 7 or gqa.inputs[1] is None:
            return "no position_ids input, RoPE already fused, or extra GQA inputs"
        q_rope, k_rope = _producer(gqa.inputs[0], "RotaryEmbedding"), _producer(gqa.inputs[1], "RotaryEmbedding")
        if q_rope is None or k_rope is None or q_rope.inputs[1:] != k_rope.inputs[1:]:
            return "q and k do not go through one RotaryEmbedding pair"
        if attr(q_rope, "rotary_embedding_dim", 0) or len(q_rope.inputs) > 3:
            return "partial rotary or RotaryEmbedding with position_ids"
        found, inv_freq = _projections(q_rope.inputs[0], k_rope.inputs[0], gqa.inputs[2]), _inv_freq(q_rope)
        if isinstance(found, str) or isinstance(inv_freq, str):
            return found if isinstance(found, str) else inv_freq
        nodes, corrections = found
        rows = self.max_positions or self.context.max_positions or 8192
        angles = np.arange(rows, dtype=np.float64)[:, None] * inv_freq[None, :]
        cos = initializer(graph, "rope_cos_cache", np.cos(angles).astype(np.float32))
        sin = initializer(graph, "rope_sin_cache", np.sin(angles).astype(np.float32))
        projections = nodes[-3:]  # after the Adds when there are corrections
        packed = [self._pack(graph, projections, gqa.name)]
        if corrections:
            packed += self._pack_corrections(graph, packed[0], corrections, gqa.name)
        for node in packed:
            node.outputs[0].dtype = ir.DataType.FLOAT
        attributes = {k: a.value for k, a in gqa.attributes.items()} | {
            "do_rotary": 1, "rotary_interleaved": int(attr(q_rope, "interleaved", 0))}
        fused = ir.node("GroupQueryAttention", [packed[-1].outputs[0], None, None, *gqa.inputs[3:7], cos, sin, positions],
                        domain=MS_DOMAIN, num_outputs=len(gqa.outputs), attributes=attributes, name=gqa.name)
        graph.insert_before(gqa, [*packed, fused])
        for old, new in zip(gqa.outputs, fused.outputs):
            new.shape, new.dtype = old.shape, old.dtype
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            new.name, old.name = old.name, f"{old.name}__fused"
        for node in (gqa, q_rope, k_rope, *nodes, *corrections):
            graph.remove(node, safe=True)
        self.count("packed_qkv_" + ("matmul_nbits" if projections[0].op_type == "MatMulNBits" else "matmul"))
        if corrections:
            self.count("packed_qkv_corrections")
        self.count("rope_into_gqa")
        return None

    def _pack_corrections(self, graph: ir.Graph, packed: ir.Node, corrections: list[ir.Node],
                          name: str) -> list[ir.Node]:
        """sums ─MatMul([Oq|Ok|Ov])─► Add(packed projection, ·): keep-quant's corrections, packed on N."""
        offsets = initializer(graph, f"{name}_qkv_offset",
                              np.concatenate([const_array(c.inputs[1]) for c in corrections], axis=1))
        correction = ir.node("MatMul", [corrections[0].inputs[0], offsets], name=f"{name}_qkv_offset")
        added = ir.node("Add", [packed.outputs[0], correction.outputs[0]], name=f"{name}_qkv_exact")
        return [correction, added]

    def _pack(self, graph: ir.Graph, nodes: list[ir.Node], name: str) -> ir.Node:
        weights = [const_array(n.inputs[1]) for n in nodes]
        if nodes[0].op_type == "MatMul":  # W [K, N]: concatenate the output channels
            w = initializer(graph, f"{name}_qkv_weight", np.concatenate(weights, axis=1))
            return ir.node("MatMul", [nodes[0].inputs[0], w], name=f"{name}_qkv")
        n_total = sum(w.shape[0] for w in weights)  # B [N, K/b, blob], scales [N, K/b] or flat
        scales = [const_array(n.inputs[2]).reshape(w.shape[0], -1) for n, w in zip(nodes, weights)]
        b = initializer(graph, f"{name}_qkv_B", np.concatenate(weights, axis=0))
        s = initializer(graph, f"{name}_qkv_scales", np.concatenate(scales, axis=0))
        attributes = {a: attr(nodes[0], a) for a in _NBITS_ATTRS} | {"N": n_total}
        return ir.node("MatMulNBits", [nodes[0].inputs[0], b, s], domain=MS_DOMAIN, attributes=attributes,
                       name=f"{name}_qkv")
