"""insert-kv-cache: give the graph the artifact I/O contract (README, "The artifact").

Each FlashAttention (in graph order = layer i) gets the cache buffers and the row lengths::

    before:  FlashAttention(q3, k3, v3) ─► o3
    after:   FlashAttention(q3, k3, v3, past_key.i, past_value.i, cache_lens) ─► o3, present_key.i, present_value.i

New graph inputs: ``cache_lens`` int32 [B], ``input_lens`` int32 [B], ``past_key.i``/``past_value.i``
[B, Hkv, max_seq, D]; new outputs ``present_key.i``/``present_value.i`` (aliases of the pasts:
the runtime binds one buffer to both). Positions come from ``position_ids`` (absolute), so RoPE and
learned position embeddings need no change; the traced mask subgraph is no longer used and is
removed by the next cleanup.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.core.io_contract import CACHE_KINDS, cache_name
from graphopt.passes._attention_match import UNFUSED_KEY, looks_like_attention, module_of
from graphopt.passes.base import GraphoptPass
from graphopt.plugins.flash_attention import has_cache, is_flash_attention

BATCH, MAX_SEQ = "batch", "max_seq"


class InsertKVCachePass(GraphoptPass):
    """Add past/present cache I/O, cache_lens and input_lens to every FlashAttention."""

    name = "insert-kv-cache"

    def requires(self, model: ir.Model) -> None:
        unfused = [n for n in model.graph if looks_like_attention(n)
                   and (n.outputs[0].uses() or n.outputs[0].is_graph_output())]
        if unfused:
            node = unfused[0]
            seen = node.metadata_props.get(UNFUSED_KEY, "fuse-attention did not run on it")
            raise ir.passes.PreconditionError(
                f"insert-kv-cache: attention in {module_of(node)} ({node.op_type} {node.name!r}"
                f"{f' and {len(unfused) - 1} more' if len(unfused) > 1 else ''}) is not fused: {seen}; without "
                "the cache it would give wrong tokens: try --attn-implementation eager, or report the model"
            )
        if not any(is_flash_attention(n) for n in model.graph):
            raise ir.passes.PreconditionError(
                "insert-kv-cache: no graphopt::FlashAttention in the graph; run 'fuse-attention' first"
            )
        if "cache_lens" in {v.name for v in model.graph.inputs}:
            raise ir.passes.PreconditionError("insert-kv-cache: the graph already has cache inputs")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        cache_lens = _input(graph, "cache_lens", ir.DataType.INT32, [BATCH])
        _input(graph, "input_lens", ir.DataType.INT32, [BATCH])
        layer = 0
        for node in list(graph):
            if not is_flash_attention(node):
                continue
            if has_cache(node):
                raise PassError(f"insert-kv-cache: FlashAttention {node.name!r} already has cache inputs")
            self._add_cache(graph, node, layer, cache_lens)
            layer += 1
        self.count("layers", layer)
        return ir.passes.PassResult(model, True)

    def _add_cache(self, graph: ir.Graph, node: ir.Node, layer: int, cache_lens: ir.Value) -> None:
        kv_heads = node.attributes["kv_num_heads"].value
        head_dim = _head_dim(node, kv_heads)
        dtype = node.inputs[1].dtype or ir.DataType.FLOAT
        shape = [BATCH, kv_heads, MAX_SEQ, head_dim]
        past = [_input(graph, cache_name("past", kind, layer), dtype, shape) for kind in CACHE_KINDS]
        sinks = list(node.inputs[6:7])  # optional per-head sink logits stay input 6
        fused = ir.node(
            "FlashAttention", [*node.inputs[:3], *past, cache_lens, *sinks], domain=node.domain, num_outputs=3,
            attributes={k: a.value for k, a in node.attributes.items()}, name=node.name,
        )
        for output, kind in zip(fused.outputs[1:], CACHE_KINDS):
            output.name, output.dtype, output.shape = cache_name("present", kind, layer), dtype, ir.Shape(shape)
            graph.outputs.append(output)
        fused.outputs[0].shape, fused.outputs[0].dtype = node.outputs[0].shape, node.outputs[0].dtype
        graph.insert_before(node, fused)
        node.outputs[0].replace_all_uses_with(fused.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)


def _head_dim(node: ir.Node, kv_heads: int) -> int:
    width = node.inputs[1].shape[-1] if node.inputs[1].shape is not None else None
    if not isinstance(width, int):
        raise PassError(f"insert-kv-cache: key width of {node.name!r} is not static; run 'cleanup' first")
    return width // kv_heads


def _input(graph: ir.Graph, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
    graph.inputs.append(value)
    return value
