"""lower-ort-cpu: map canonical ops onto ONNX Runtime's fastest CPU kernels.

    FlashAttention(q3,k3,v3,past_k,past_v,cache_lens[,sinks])
        ─► com.microsoft.GroupQueryAttention(q3,k3,v3,past_k,past_v,seqlens_k,total_seq[,…,head_sink=sinks])
           window → local_window_size, softcap → softcap, scale → scale (each checked against the
           reference by the architecture parity tests)
           seqlens_k = cache_lens + S - 1 ; total_seq = max(cache_lens) + S   (computed once)
           past and present are one buffer: the runtime binds the same memory to both
    Add(a, b) ─► RMSNormalization(·, w)    (sum also used: the residual)
        ─► com.microsoft.SkipSimplifiedLayerNormalization(a, b, w) ─► (normed, …, sum)
    RMSNormalization(x, w) ─► SimplifiedLayerNormalization(x, w)

GQA on the CPU EP refuses batch > 1 with S > 1 when a cache exists: the runtime splits such
calls per row. Options: ``rmsnorm`` (default true) lowers the norms.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._edit import attr
from graphopt.passes.base import GraphoptPass
from graphopt.plugins.flash_attention import has_cache, is_flash_attention

MS_DOMAIN = "com.microsoft"


class LowerOrtCpuPass(GraphoptPass):
    """FlashAttention → GroupQueryAttention; RMSNorm → (Skip)SimplifiedLayerNormalization."""

    name = "lower-ort-cpu"

    def __init__(self, rmsnorm: bool = True) -> None:
        super().__init__()
        self.rmsnorm = rmsnorm

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        attention = [n for n in graph if is_flash_attention(n)]
        if attention:
            lengths = _lengths(graph)
            for node in attention:
                self._attention(graph, node, lengths)
        if self.rmsnorm:
            for node in list(graph):
                if node.graph is not None and node.op_type == "RMSNormalization" and node.domain == "":
                    self._rmsnorm(graph, node)
        modified = bool(self.stats)
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified)

    def _attention(self, graph: ir.Graph, node: ir.Node, lengths: tuple[ir.Value, ir.Value]) -> None:
        if not has_cache(node):
            raise PassError(f"lower-ort-cpu: FlashAttention {node.name!r} has no cache inputs; run 'insert-kv-cache' first")
        a = {k: v.value for k, v in node.attributes.items()}
        window = int(a.get("window", -1))
        sinks = node.inputs[6] if len(node.inputs) > 6 else None
        extra = [None, None, None, None, sinks] if sinks is not None else []  # cos, sin, position_ids, bias, head_sink
        if sinks is not None:
            self.count("head_sink")
        gqa = ir.node(
            "GroupQueryAttention", [*node.inputs[:5], *lengths, *extra], domain=MS_DOMAIN, num_outputs=3,
            name=node.name,
            attributes={"num_heads": int(a["num_heads"]), "kv_num_heads": int(a["kv_num_heads"]),
                        "scale": float(a["scale"]), "softcap": float(a.get("softcap", 0.0)),
                        "local_window_size": window if window > 0 else -1},
        )
        graph.insert_before(node, gqa)
        for old, new in zip(node.outputs, gqa.outputs):
            new.name, new.shape, new.dtype = old.name, old.shape, old.dtype
            old.name = f"{old.name}__lowered"
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        self.count("group_query_attention")

    def _rmsnorm(self, graph: ir.Graph, node: ir.Node) -> None:
        x, weight = node.inputs[0], node.inputs[1]
        add = x.producer()
        if attr(node, "axis", -1) != -1 or weight is None:
            self.note(f"RMSNormalization {node.name!r} kept: axis is not -1")
            return
        eps = float(attr(node, "epsilon", 1e-5))
        if add is not None and add.op_type == "Add" and add.domain == "" and _same_shape(*add.inputs):
            fused = ir.node("SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], weight],
                            domain=MS_DOMAIN, num_outputs=4, attributes={"epsilon": eps}, name=node.name)
            graph.insert_before(add, fused)
            for new, old in ((fused.outputs[0], node.outputs[0]), (fused.outputs[3], add.outputs[0])):
                new.shape, new.dtype = old.shape, old.dtype
            node.outputs[0].replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
            add.outputs[0].replace_all_uses_with(fused.outputs[3], replace_graph_outputs=True)
            graph.remove(node, safe=True)
            graph.remove(add, safe=True)
            self.count("skip_simplified_layer_norm")
            return
        fused = ir.node("SimplifiedLayerNormalization", [x, weight], num_outputs=1, name=node.name,
                        attributes={"epsilon": eps, "axis": -1, "stash_type": 1})
        graph.insert_before(node, fused)
        fused.outputs[0].shape, fused.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
        node.outputs[0].replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        self.count("simplified_layer_norm")


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and len(a.shape) == 3 and a.shape == b.shape


def _lengths(graph: ir.Graph) -> tuple[ir.Value, ir.Value]:
    """seqlens_k = cache_lens + S - 1 and total_sequence_length = max(cache_lens) + S, once per graph."""
    inputs = {v.name: v for v in graph.inputs}
    if "cache_lens" not in inputs:
        raise PassError("lower-ort-cpu: no 'cache_lens' input; run 'insert-kv-cache' first")
    tape = ir.tape.Tape()
    const = lambda v: tape.op("Constant", [], attributes={"value": ir.tensor(np.array(v, np.int32))})  # noqa: E731
    seq64 = tape.op("Shape", [inputs["input_ids"]], attributes={"start": 1, "end": 2})
    seq = tape.op("Cast", [seq64], attributes={"to": ir.DataType.INT32})
    seqlens_k = tape.op("Sub", [tape.op("Add", [inputs["cache_lens"], seq]), const([1])])
    longest = tape.op("ReduceMax", [inputs["cache_lens"]], attributes={"keepdims": 0})
    total = tape.op("Add", [longest, tape.op("Squeeze", [seq])])
    graph.insert_before(graph.node(0), tape.nodes)
    return seqlens_k, total
