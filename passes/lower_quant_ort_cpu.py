"""lower-quant-ort-cpu: map the Q/DQ graph onto ONNX Runtime's fast CPU quantized kernels.

    MatMul(x, DQ(W int4|int8 [K,N], s [K/b,N], axis 0, block b))
        ─► com.microsoft.MatMulNBits(x, B uint8 [N,K/b,b·bits/8], s [N,K/b])   zero point 8|128 implied
    MatMul(h, Transpose(DQ(E int4|int8 [V,H], s [V,H/b], axis 1, block b)))      (tied lm_head)
        ─► MatMulNBits(h, B_E [V,H/b,b·bits/8], s)    N = V, K = H: E's rows are already B's layout
    Gather(DQ(E …), input_ids)
        ─► com.microsoft.GatherBlockQuantized(Reshape(B_E, [V, H·bits/8]), input_ids, s)   same bytes
    MatMul(DQ(DynamicQuantizeLinear(x)), DQ(W int8 [K,N], s [N], axis 1))
        ─► com.microsoft.DynamicQuantizeMatMul(x, W, s)           (uint8 activations per call)
    MatMul(DQ(QuantizeLinear(x, a, 0 int8)), DQ(W int8, s [N], axis 1))
        ─► QuantizeLinear(x, a, 128 uint8) ─► com.microsoft.MatMulIntegerToFloat(x_u8, W, a, s, 128)
    fp8 Q/DQ: kept as is — ORT has no fp8 CPU kernel, so on ort-cpu fp8 only simulates the numbers.

Symmetric int values are stored unsigned with the kernels' default zero point (8 for int4, 128 for
int8), so no zero-point tensors are written. ``accuracy_level`` is MatMulNBits' compute type:
4 (default) quantizes activations to int8 per block — about 3× faster on AVX2 CPUs — and 0/1
computes in fp32 (exact w.r.t. the Q/DQ graph). Letters: K/N in/out channels, V vocab, H hidden,
b block size.

``split_int8`` (for fp32 compute): ONNX Runtime 1.32 has no fp32 kernel for 8-bit MatMulNBits and
dequantizes the whole weight on every call (0.24 s for SmolLM2's 576×49152 lm_head), so each int8 block
becomes two exact 4-bit halves, q = 16·hi + lo with hi = q >> 4 ∈ [-8, 7] and lo = q & 15 ∈ [0, 15]::

    MatMul(x, DQ(W int8, s))  ─►  Add(MatMulNBits(x, hi, 16·s), MatMulNBits(x, lo, s, zero point 0))
    Gather(DQ(E int8, s), ids) ─► Add(GatherBlockQuantized(hi, 16·s), GatherBlockQuantized(lo, s, zero point 0))

The same bytes as int8 (two nibbles per value), both halves exact in fp32.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._edit import attr, initializer
from graphopt.passes._quant_graph import record_precision
from graphopt.passes.base import GraphoptPass
from graphopt.quant.numerics import pack_uint4

MS_DOMAIN = "com.microsoft"


def _dq(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == "DequantizeLinear" and node.domain == "" else None


def _const_dq(value: ir.Value | None) -> ir.Node | None:
    """A DequantizeLinear of constant int4/int8 values with a constant scale and no zero point."""
    node = _dq(value)
    if node is None or len(node.inputs) > 2 and node.inputs[2] is not None:
        return None
    q, scale = node.inputs[0], node.inputs[1]
    if q.const_value is None or scale.const_value is None or q.dtype not in (ir.DataType.INT4, ir.DataType.INT8):
        return None
    return node


def _values(value: ir.Value) -> np.ndarray:
    return value.const_value.numpy().astype(np.int8)


def _rows_to_nbits(q_rows: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Signed values [N, K] → MatMulNBits' B [N, K/b, b·bits/8] (uint4 nibbles or uint8, offset by 2^(bits-1))."""
    n, k = q_rows.shape
    blocks = q_rows.reshape(n, k // block, block)
    return pack_uint4(blocks) if bits == 4 else (blocks.astype(np.int16) + 128).astype(np.uint8)


class LowerQuantOrtCpuPass(GraphoptPass):
    """int4/int8 Q/DQ → MatMulNBits, GatherBlockQuantized, DynamicQuantizeMatMul, MatMulIntegerToFloat."""

    name = "lower-quant-ort-cpu"

    def __init__(self, accuracy_level: int = 4, split_int8: bool = False) -> None:
        super().__init__()
        self.accuracy_level = accuracy_level
        self.split_int8 = split_int8
        self.lossy = accuracy_level >= 2  # int8 activations inside MatMulNBits

    def requires(self, model: ir.Model) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise PassError(f"lower-quant-ort-cpu: accuracy_level {self.accuracy_level} is not 0–4; "
                            "use 4 (fast, int8 activations) or 0 (fp32 compute)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shared: dict[str, tuple[ir.Value, ir.Value, int, int]] = {}  # DQ output name → (B, scales, bits, block)
        for node in list(graph):
            if node.graph is None:
                continue
            if node.op_type == "MatMul" and node.domain == "":
                self._matmul(graph, node, shared)
            elif node.op_type == "Gather" and node.domain == "":
                self._gather(graph, node, shared)
        fp8 = sum(1 for n in graph if n.op_type == "QuantizeLinear" and _is_fp8(n))
        if fp8:
            self.count("fp8_qdq_simulated", fp8)
            record_precision(self.context, note=f"fp8 on ort-cpu is a fidelity simulation: ONNX Runtime has no fp8 CPU "
                                         f"kernel, so {fp8} fp8 Q/DQ pairs run in fp32 (no speed-up, same numbers as "
                                         "an fp8 engine); the Q/DQ graph is the one TensorRT builds fp8 engines from")
        nbits = self.stats.get("matmul_nbits", 0) + self.stats.get("lm_head", 0)
        if self.lossy and nbits and "activations" not in self.context.results.precision:
            record_precision(self.context, activations="int8 per weight block inside MatMulNBits "
                                                       f"(accuracy_level {self.accuracy_level}), fp32 elsewhere")
        modified = any(k != "fp8_qdq_simulated" for k in self.stats)
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified)

    def _matmul(self, graph: ir.Graph, node: ir.Node, shared: dict) -> None:
        x, w = node.inputs
        transpose = w.producer() if w is not None and w.producer() is not None else None
        if transpose is not None and transpose.op_type == "Transpose" and _const_dq(transpose.inputs[0]) \
                and tuple(attr(transpose, "perm", ())) == (1, 0):
            dq = _const_dq(transpose.inputs[0])
            if attr(dq, "axis", 0) == 1 and attr(dq, "block_size", 0):
                self._replace(graph, node, self._nbits(graph, node, x, *self._rows(graph, dq, shared)), "lm_head")
            return
        dq = _const_dq(w)
        if dq is None:
            return
        block = attr(dq, "block_size", 0)
        if block and attr(dq, "axis", 0) == 0:  # int4 or int8 blocks along K
            q = np.ascontiguousarray(_values(dq.inputs[0]).T)  # [N, K]: MatMulNBits holds B transposed
            scales = np.ascontiguousarray(dq.inputs[1].const_value.numpy().T)  # [N, K/b]
            parts = self._parts(graph, dq.inputs[0].name, q, scales, dq.inputs[0].dtype, block)
            self._replace(graph, node, self._nbits(graph, node, x, parts, block), "matmul_nbits")
        elif dq.inputs[0].dtype == ir.DataType.INT8 and not block and attr(dq, "axis", 1) in (1, -1):
            self._int8(graph, node, x, dq)

    def _parts(self, graph: ir.Graph, name: str, q_rows: np.ndarray, scales: np.ndarray, dtype: ir.DataType,
               block: int) -> list[tuple[ir.Value, ir.Value, ir.Value | None, int]]:
        """(B, scales, zero points or None, bits) summing to the weight: one int4/int8 part, or the two
        4-bit halves of int8 with ``split_int8`` (see the module docstring)."""
        bits = 4 if dtype == ir.DataType.INT4 else 8
        if bits == 4 or not self.split_int8:
            return [(initializer(graph, f"{name}_nbits", _rows_to_nbits(q_rows, bits, block)),
                     initializer(graph, f"{name}_nbits_scale", scales), None, bits)]
        hi, lo = q_rows >> 4, q_rows & 15  # arithmetic shift: hi in [-8, 7]; lo in [0, 15]
        zeros = np.zeros((q_rows.shape[0], -(-q_rows.shape[1] // block // 2)), np.uint8)
        self.count("int8_split_in_two_int4")
        return [(initializer(graph, f"{name}_hi_nbits", _rows_to_nbits(hi, 4, block)),
                 initializer(graph, f"{name}_hi_scale", (scales * 16).astype(np.float32)), None, 4),
                (initializer(graph, f"{name}_lo_nbits", _rows_to_nbits(lo - 8, 4, block)),  # nibble = lo
                 initializer(graph, f"{name}_lo_scale", scales), initializer(graph, f"{name}_lo_zero", zeros), 4)]

    def _rows(self, graph: ir.Graph, dq: ir.Node, shared: dict) -> tuple[list, int]:
        """The parts of a row-blocked table E [V, H] (axis 1), made once and shared by its readers."""
        key = dq.outputs[0].name
        if key not in shared:
            block = attr(dq, "block_size", 0)
            shared[key] = (self._parts(graph, dq.inputs[0].name, _values(dq.inputs[0]),
                                       dq.inputs[1].const_value.numpy(), dq.inputs[0].dtype, block), block)
        return shared[key]

    def _nbits(self, graph: ir.Graph, anchor: ir.Node, x: ir.Value, parts: list, block: int) -> ir.Node:
        """One MatMulNBits per part, summed; returns the last node (its output is the product)."""
        nodes = []
        for b, s, zero, bits in parts:
            n, k_blocks = b.shape[0], b.shape[1]
            nodes.append(ir.node("MatMulNBits", [x, b, s] + ([zero] if zero is not None else []), domain=MS_DOMAIN,
                                 name=anchor.name + (f"_part{len(nodes)}" if len(parts) > 1 else ""),
                                 attributes={"K": k_blocks * block, "N": n, "bits": bits, "block_size": block,
                                             "accuracy_level": self.accuracy_level}))
        return self._summed(graph, anchor, nodes)

    def _summed(self, graph: ir.Graph, anchor: ir.Node, nodes: list[ir.Node]) -> ir.Node:
        if len(nodes) > 1:
            nodes.append(ir.node("Add", [nodes[0].outputs[0], nodes[1].outputs[0]], name=f"{anchor.name}_sum"))
            for node in nodes[:2]:
                node.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(anchor, nodes)
        return nodes[-1]

    def _int8(self, graph: ir.Graph, node: ir.Node, x_dq: ir.Value, w_dq: ir.Node) -> None:
        act = _dq(x_dq)
        quant = act.inputs[0].producer() if act is not None else None
        w, s = w_dq.inputs[0], w_dq.inputs[1]
        if quant is not None and quant.op_type == "DynamicQuantizeLinear":
            fused = ir.node("DynamicQuantizeMatMul", [quant.inputs[0], w, s], domain=MS_DOMAIN, name=node.name)
            graph.insert_before(node, fused)
            self._replace(graph, node, fused, "dynamic_quantize_matmul")
        elif quant is not None and quant.op_type == "QuantizeLinear" and act.inputs[1].const_value is not None:
            a_scale = act.inputs[1]
            zero = initializer(graph, "act_zero_point_u8", np.array(128, np.uint8))
            x_u8 = ir.node("QuantizeLinear", [quant.inputs[0], a_scale, zero], name=f"{node.name}_quantize_u8")
            fused = ir.node("MatMulIntegerToFloat", [x_u8.outputs[0], w, a_scale, s, zero], domain=MS_DOMAIN,
                            name=node.name)
            graph.insert_before(node, [x_u8, fused])
            self._replace(graph, node, fused, "matmul_integer_to_float")
        else:
            self.note(f"MatMul {node.name!r} kept as Q/DQ: its int8 weight has no int8 activation quantizer")

    def _gather(self, graph: ir.Graph, node: ir.Node, shared: dict) -> None:
        dq = _const_dq(node.inputs[0])
        if dq is None or attr(node, "axis", 0) != 0 or attr(dq, "axis", 0) != 1 or not attr(dq, "block_size", 0):
            return
        parts, block = self._rows(graph, dq, shared)
        gathers = []
        for b, s, zero, bits in parts:
            vocab, flat = b.shape[0], b.shape[1] * b.shape[2]
            shape = initializer(graph, f"{b.name}_rows_shape", np.array([vocab, flat], np.int64))
            reshape = ir.node("Reshape", [b, shape], name=f"{b.name}_rows")
            reshape.outputs[0].dtype, reshape.outputs[0].shape = ir.DataType.UINT8, ir.Shape([vocab, flat])
            graph.insert_before(node, reshape)
            gathers.append(ir.node("GatherBlockQuantized", [reshape.outputs[0], node.inputs[1], s]
                                   + ([zero] if zero is not None else []), domain=MS_DOMAIN,
                                   name=node.name + (f"_part{len(gathers)}" if len(parts) > 1 else ""),
                                   attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits}))
        self._replace(graph, node, self._summed(graph, node, gathers), "gather_block_quantized")

    def _replace(self, graph: ir.Graph, old: ir.Node, new: ir.Node, counter: str) -> None:
        out, new_out = old.outputs[0], new.outputs[0]
        new_out.shape, new_out.dtype = out.shape, out.dtype
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        name = out.name
        graph.remove(old, safe=True)
        new_out.name = name
        self.count(counter)


def _is_fp8(node: ir.Node) -> bool:
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    return zero is not None and zero.dtype == ir.DataType.FLOAT8E4M3FN
