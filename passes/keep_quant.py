"""keep-quant: a pre-quantized GGUF's or GPTQ/AWQ checkpoint's weights as their own int4/int8 blocks — exact,
no second rounding.

Every MatMul whose fp32 weight is a GGUF tensor's dequantized values (found by content:
graphopt.sources.gguf_weights; a Hugging Face GPTQ/AWQ Linear's: graphopt.sources.hf_quant), and the token
embedding with its tied lm_head::

    before:  x [B,S,K] ─MatMul(·, W [K,N] fp32)─► y            W[k,n] = scale[k/b,n]·q[k,n] + offset[k/b,n]
    after:   x ─MatMul(·, DQ(q int4|int8 [K,N], scale [K/b,N], axis 0, block b))─────────────────────┐
             x ─Reshape [B,S,K/b,b]─ReduceSum(-1)─► sums [B,S,K/b] ─MatMul(·, offset [K/b,N])─► Add ─┴─► y
    before:  Gather(E [V,H], input_ids)      MatMul(h, Transpose(E))                   (tied lm_head)
    after:   Gather(DQ(E_q, scale [V,H/b], axis 1, block b), …)   MatMul(h, Transpose(DQ(…)))

The second row exists only for types with a per-block minimum (Q4_1, Q5_1, Q4_K, Q5_K): since
x·W = x·DQ(q) + Σ_blocks (Σ_{k in block} x_k)·offset, one small MatMul of the input's block sums by the
offsets adds it back exactly; the block sums of an input shared by several projections (q/k/v, gate/up) are
computed once. GPTQ act-order (g_idx not k // b) keeps its groups as blocks by reading the input's channels
in group order, ``x ─Gather(axis -1, order)─► x'`` (a permutation: exact; once per input, like the sums).
DQ has zero-point 0 (TensorRT's form); 'lower-quant-ort-cpu' turns DQ+MatMul into
MatMulNBits. An embedding with offsets stays fp32 (exact too, only larger; noted). Weights the GGUF holds
in a float type stay fp32. Letters: B batch, S seq, K/N in/out channels, V vocab, H hidden, b block size.

Needs ``context.quantized_weights`` (``graphopt build MODEL.gguf --keep-quant`` reads them); a quantized
GGUF tensor that matches no traced weight is an error, never a silent fp32 fallback.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._edit import initializer
from graphopt.passes._quant_graph import Linear, dequantize_node, drop_unused, record_precision, weight_targets
from graphopt.passes.base import GraphoptPass
from graphopt.quant.gguf_blocks import BlockQuant
from graphopt.quant.numerics import Quantized
from graphopt.sources.gguf_weights import fingerprint


class KeepQuantPass(GraphoptPass):
    """A pre-quantized GGUF's weights as exact int4/int8 Q/DQ blocks (+ a block-minimum correction)."""

    name = "keep-quant"
    lossy = True  # only nominally (the offsets add in another order): so the build measures it against fp32

    def requires(self, model: ir.Model) -> None:
        if self.context.quantized_weights is None:
            raise PassError("keep-quant: the build read no pre-quantized weights; run it through "
                            "'graphopt build MODEL.gguf --keep-quant' (a GGUF of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/K-quant types) "
                            "or 'graphopt build HF_DIR --keep-quant' (a GPTQ or AWQ checkpoint)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, weights = model.graph, self.context.quantized_weights
        linears, embedding, fp32 = weight_targets(graph, embedding=True)
        used: set[str] = set()
        sums: dict[tuple[str, int], ir.Value] = {}
        for lin in linears:
            key = fingerprint(lin.array.T)
            if key not in weights.by_content:
                self.count("matmuls_kept_float")
                continue
            self._linear(graph, lin, weights.by_content[key][1], sums)
            used.add(key)
        if embedding is not None:
            key = fingerprint(embedding.array)
            if key in weights.by_content:
                used.add(key)
                self._embedding(graph, embedding, *weights.by_content[key])
        missing = [weights.by_content[k] for k in weights.by_content if k not in used]
        if missing:
            name, blocks = missing[0]
            raise PassError(f"keep-quant: {weights.kind.upper()} tensor '{name}' ({blocks.gguf_type}) matches no "
                            "weight of the traced "
                            f"graph ({len(missing)} such tensors; the loader changes them for this architecture); "
                            "build without --keep-quant")
        drop_unused(graph, fp32)
        types = ", ".join(f"{n} {t}" for t, n in sorted(weights.types.items()))
        record_precision(self.context, weights=f"{weights.kind} {types} kept exactly (int4/int8 blocks, zero-point 0, "
                         "+ block-minimum correction)")
        return ir.passes.PassResult(model, bool(used))

    def _linear(self, graph: ir.Graph, lin: Linear, blocks: BlockQuant, sums: dict) -> None:
        if blocks.input_order is not None:
            self._reorder_input(graph, lin, blocks.input_order, sums)
        qz = Quantized(np.ascontiguousarray(blocks.q.T), np.ascontiguousarray(blocks.scale.T), axis=0,
                       block_size=blocks.block, kind=f"int{blocks.bits}")
        lin.node.replace_input_with(1, dequantize_node(graph, lin.node, qz, lin.weight.name))
        self.count(f"matmuls_{blocks.gguf_type.lower()}")
        if blocks.offset is not None:
            self._add_offset(graph, lin, blocks, sums)

    def _reorder_input(self, graph: ir.Graph, lin: Linear, order: np.ndarray, shared: dict) -> None:
        """x' = x[..., order]: the input channels in the blocks' order (made once per input and order)."""
        x = lin.node.inputs[0]
        key = (x.name, "order", order.tobytes())
        if key not in shared:
            name = f"{x.name}_reordered_{len(shared)}"
            indices = initializer(graph, f"{name}_indices", order.astype(np.int64))
            node = ir.node("Gather", [x, indices], attributes={"axis": -1}, name=name)
            node.outputs[0].name, node.outputs[0].dtype = name, x.dtype
            node.outputs[0].shape = None if x.shape is None else ir.Shape(list(x.shape))
            graph.insert_before(lin.node, node)
            shared[key] = node.outputs[0]
            self.count("reordered_inputs")
        lin.node.replace_input_with(0, shared[key])

    def _add_offset(self, graph: ir.Graph, lin: Linear, blocks: BlockQuant, sums: dict) -> None:
        """y = x·DQ(q) + sums(x)·offset, the block sums of x made once per input."""
        x, k, b = lin.node.inputs[0], blocks.q.shape[1], blocks.block
        if (x.name, b) not in sums:
            sums[(x.name, b)] = self._block_sums(graph, lin.node, x, k, b)
        offset = initializer(graph, f"{lin.weight.name}_offset", np.ascontiguousarray(blocks.offset.T))
        y = lin.node.outputs[0]
        correction = ir.node("MatMul", [sums[(x.name, b)], offset], name=f"{lin.node.name}_offset")
        added = ir.node("Add", [correction.outputs[0], correction.outputs[0]], name=f"{lin.node.name}_add_offset")
        for value in (correction.outputs[0], added.outputs[0]):
            value.dtype, value.shape = ir.DataType.FLOAT, y.shape
        correction.outputs[0].name, added.outputs[0].name = f"{y.name}_offset", f"{y.name}_exact"
        graph.insert_after(lin.node, [correction, added])
        was_output = y.is_graph_output()
        y.replace_all_uses_with(added.outputs[0], replace_graph_outputs=True)
        added.replace_input_with(0, y)
        if was_output:  # the exact sum keeps the output's name
            name, y.name = y.name, f"{y.name}_main"
            added.outputs[0].name = name
        self.count("offset_corrections")

    @staticmethod
    def _block_sums(graph: ir.Graph, before: ir.Node, x: ir.Value, k: int, b: int) -> ir.Value:
        """sums[..., j] = Σ_i x[..., j·b + i]: Reshape to [..., K/b, b] (0 keeps a leading dim) + ReduceSum of the
        last axis. (A MatMul by a 0/1 matrix [K, K/b] gives the same sums but reads K²/b floats per call: on
        SmolLM2 that was 12.6 MB of every decode step.)"""
        rank = len(x.shape) if x.shape is not None else 3
        shape = initializer(graph, f"block_sums_shape_{rank}_{k}x{b}",
                            np.array([0] * (rank - 1) + [k // b, b], np.int64))
        axes = initializer(graph, "block_sums_axes", np.array([-1], np.int64))
        blocks = ir.node("Reshape", [x, shape], name=f"{x.name}_blocks")
        total = ir.node("ReduceSum", [blocks.outputs[0], axes], attributes={"keepdims": 0}, name=f"{x.name}_block_sums")
        blocks.outputs[0].name, total.outputs[0].name = f"{x.name}_blocks", f"{x.name}_block_sums"
        for value in (blocks.outputs[0], total.outputs[0]):
            value.dtype = ir.DataType.FLOAT
        if x.shape is not None:
            lead = list(x.shape)[:-1]
            blocks.outputs[0].shape, total.outputs[0].shape = ir.Shape(lead + [k // b, b]), ir.Shape(lead + [k // b])
        graph.insert_before(before, [blocks, total])
        return total.outputs[0]

    def _embedding(self, graph: ir.Graph, embedding, name: str, blocks: BlockQuant) -> None:
        if blocks.offset is not None:
            self.note(f"keep-quant: the embedding '{name}' ({blocks.gguf_type}) has block minima; kept as its exact "
                      "fp32 values")
            return
        qz = Quantized(blocks.q, blocks.scale, axis=1, block_size=blocks.block, kind=f"int{blocks.bits}")
        dq = dequantize_node(graph, graph.node(0), qz, embedding.table.name)  # before every reader
        embedding.table.replace_all_uses_with(dq)
        self.count(f"embedding_{blocks.gguf_type.lower()}")
        if embedding.lm_head is not None:
            self.count("tied_lm_head")
