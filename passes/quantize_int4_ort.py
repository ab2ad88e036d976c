"""quantize-int4-ort: ONNX Runtime's own int4 quantizer (MatMulNBitsQuantizer, round-to-nearest) as a peer.

The reference point graphopt's int4 recipe is measured against (``graphopt compare ort-cpu-int4
ort-cpu-int4-ort-rtn``): every weight goes through ``onnxruntime.quantization.matmul_nbits_quantizer`` —
its real code, its numbers — and the result is copied into the graph in place::

    before:  MatMul(x, W [K,N] fp32)                 Gather(E [V,H] fp32, input_ids)
             MatMul(h, Transpose(E))                 (the tied lm_head)
    after:   MatMulNBits(x, B uint8 [N,K/b,b/2], s)  GatherBlockQuantized(E_q int4 [V,H], input_ids, s)
             MatMulNBits(h, B_E, s_E)                (the lm_head untied: E^T quantized as its own MatMul)

How: one throwaway ONNX model holds a MatMul per weight (and the Gather of E), ORT's
``MatMulNBitsQuantizer`` with ``DefaultWeightOnlyQuantConfig(block_size, is_symmetric=True,
accuracy_level)`` quantizes it (``op_types_to_quantize`` MatMul and Gather), and each quantized node with
its initializers replaces the original here. ORT's symmetric int4 maps each block's largest-magnitude weight
to -8 exactly (scale = that weight / -8, so it may be negative) and rounds the rest to nearest in [-8, 7]:
16 levels per block. The tied lm_head gets its own int4 copy of E^T (ORT's quantizer does not quantize a
MatMul whose weight is a Transpose), so the embedding is stored twice (+~14 MB for SmolLM2's 49152×576);
GenAI's builder shares one int4 table between GatherBlockQuantized and the lm_head instead.

Options: ``block_size`` 32 (16–256, a power of two), ``accuracy_level`` 4 (MatMulNBits' int8 activations,
as lower-quant-ort-cpu), ``embedding`` (default true): the embedding and the lm_head too. Runs after
'lower-ort-cpu' (no calibration: RTN needs none). Letters: K/N in/out channels, V vocab, H hidden, b block.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import find_embedding, find_linears, record_precision
from graphopt.passes.base import GraphoptPass

BLOCK_SIZES = (16, 32, 64, 128, 256)
MS_DOMAIN = "com.microsoft"


class QuantizeInt4OrtPass(GraphoptPass):
    """int4 weights by ONNX Runtime's MatMulNBitsQuantizer (RTN, symmetric): the peer row of int4 recipes."""

    name = "quantize-int4-ort"
    lossy = True

    def __init__(self, block_size: int = 32, accuracy_level: int = 4, embedding: bool = True) -> None:
        super().__init__()
        self.block_size, self.accuracy_level, self.embedding = block_size, accuracy_level, embedding

    def requires(self, model: ir.Model) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise PassError(f"quantize-int4-ort: block_size {self.block_size} is not one of {list(BLOCK_SIZES)}; "
                            "use 32, 64 or 128")
        try:
            import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401
        except ImportError:
            raise PassError("quantize-int4-ort needs onnxruntime's quantization tools: "
                            "pip install onnxruntime") from None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        linears = [lin for lin in find_linears(graph) if lin.array.shape[0] % self.block_size == 0]
        if skipped := len(find_linears(graph)) - len(linears):
            self.note(f"quantize-int4-ort: {skipped} MatMul(s) whose input dimension block {self.block_size} "
                      "does not divide stay fp32")
        embedding = find_embedding(graph) if self.embedding else None
        targets: list[tuple[ir.Node, str, np.ndarray]] = [(lin.node, "MatMul", lin.array) for lin in linears]
        if embedding is not None:
            targets.append((embedding.gather, "Gather", embedding.array))
            if embedding.lm_head is not None:
                targets.append((embedding.lm_head, "MatMul", np.ascontiguousarray(embedding.array.T)))
        if not targets:
            return ir.passes.PassResult(model, False)
        quantized = ort_quantize([(op, array) for _, op, array in targets], self.block_size, self.accuracy_level)
        for (node, op, _), (new_op, attributes, tensors) in zip(targets, quantized):
            self._replace(graph, node, new_op, attributes, tensors)
            self.count("matmul_nbits" if new_op == "MatMulNBits" else "gather_block_quantized")
        for value in list(graph.initializers.values()):
            if not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)
        record_precision(self.context, self.stats,
                         weights=f"int4 block {self.block_size} symmetric (ort-rtn)",
                         embedding=f"int4 block {self.block_size} (ort-rtn)" if embedding is not None else "fp32")
        return ir.passes.PassResult(model, True)

    def _replace(self, graph: ir.Graph, node: ir.Node, op: str, attributes: dict, tensors: list[ir.Tensor]) -> None:
        """``node`` → ``op`` over its activation input and ORT's quantized initializers (same output name)."""
        base = (node.inputs[1] if op == "MatMulNBits" else node.inputs[0]).name or node.name
        values = []
        for index, tensor in enumerate(tensors):
            name = f"{base}_ort_{index}"
            copy = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=name)
            value = ir.Value(name=name, const_value=copy, shape=ir.Shape(tensor.shape),
                             type=ir.TensorType(tensor.dtype))
            graph.register_initializer(value)
            values.append(value)
        if op == "MatMulNBits":
            inputs = [node.inputs[0], *values]
        else:  # GatherBlockQuantized(data, indices, scales)
            inputs = [values[0], node.inputs[1], *values[1:]]
        new = ir.node(op, inputs, attributes=attributes, domain=MS_DOMAIN, name=node.name)
        out = node.outputs[0]
        new.outputs[0].shape, new.outputs[0].dtype = out.shape, out.dtype
        graph.insert_before(node, new)
        out.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
        name = out.name
        graph.remove(node, safe=True)
        new.outputs[0].name = name


def ort_quantize(weights: list[tuple[str, np.ndarray]], block_size: int, accuracy_level: int
                 ) -> list[tuple[str, dict, list[ir.Tensor]]]:
    """Run ONNX Runtime's MatMulNBitsQuantizer on a throwaway model with one node per (op, weight):
    per weight, the quantized node's op type, attributes and constant inputs (tensors, in input order)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    nodes, inputs, outputs, inits = [], [], [], []
    for i, (op, array) in enumerate(weights):
        inits.append(numpy_helper.from_array(array.astype(np.float32), f"w{i}"))
        if op == "MatMul":
            inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, 1, array.shape[0]]))
            nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"], name=f"n{i}"))
        else:
            inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.INT64, [1, 1]))
            nodes.append(helper.make_node("Gather", [f"w{i}", f"x{i}"], [f"y{i}"], name=f"n{i}", axis=0))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    proto = helper.make_model(helper.make_graph(nodes, "weights", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)])
    proto.ir_version = 10
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                          op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
    with np.errstate(divide="ignore", invalid="ignore"):  # its Gather path divides all-zero rows by 0, then masks
        quantizer.process()
    out = ir.serde.deserialize_model(quantizer.model.model)
    by_output = {node.outputs[0].name: node for node in out.graph}
    results = []
    for i, (op, _) in enumerate(weights):
        node = by_output.get(f"y{i}")
        if node is None or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            raise PassError(f"quantize-int4-ort: ONNX Runtime's quantizer left weight {i} ({op}) unquantized; "
                            "check the onnxruntime version (needs MatMulNBitsQuantizer with Gather support, ≥ 1.20)")
        tensors = [value.const_value for value in node.inputs if value is not None and value.const_value is not None]
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        results.append((node.op_type, attributes, tensors))
    return results
