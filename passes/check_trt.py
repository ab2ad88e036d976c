"""check-trt: hold a graph against what TensorRT's ONNX parser documents, before any TensorRT runs.

Matches every node of the graph and of its model-local functions; changes nothing::

    before:  any graph                after:  the same graph, or a PassError naming the first offending node
                                              ("check-trt: node 'Attention_3' (Attention): query is float32 …")

Rules (TensorRT 10.x/11 ONNX parser support matrix; tests/targets/test_trt_aot.py for what TensorRT-RTX builds here):
  - opset ≤ 24 and every op in SUPPORTED_OPS at the imported opset (an op newer than 24 fails by name);
  - custom-domain nodes only as graphopt::FlashAttention plugin nodes with a model-local function
    (TensorRT without the plugin inlines it; an unregistered custom op fails "Plugin not found");
  - tensor types in SUPPORTED_TYPES; Attention with float16/bfloat16 q/k/v (no fused fp32 kernel),
    no past/present (the parser reads one output), mask bool or the q dtype;
  - Q/DQ: constant scales, zero-point absent or constant zero; int4 only as a DequantizeLinear of a
    constant weight with a block_size (weight-only).
Letters: B batch, S seq, T cache capacity. Stats: nodes_checked, functions_checked, plugin_nodes.
"""

from __future__ import annotations

import numpy as np
import onnx.defs
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._edit import attr, const_array
from graphopt.passes.base import GraphoptPass

MAX_OPSET = 24
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GroupNormalization HardSigmoid HardSwish Identity If
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop MatMul Max
MaxPool Mean Min Mish Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear RMSNormalization Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize RotaryEmbedding Round ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh
Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter Tile TopK
Transpose Trilu Unsqueeze Where Xor
""".split())
T = ir.DataType
SUPPORTED_TYPES = frozenset({T.FLOAT, T.FLOAT16, T.BFLOAT16, T.INT32, T.INT64, T.INT8, T.UINT8, T.BOOL,
                             T.FLOAT8E4M3FN, T.INT4})
LOW_PRECISION = (T.FLOAT16, T.BFLOAT16)
PLUGIN = ("graphopt", "FlashAttention")


class CheckTrtPass(GraphoptPass):
    """Fail the build, naming the node, on anything TensorRT's ONNX parser does not support."""

    name = "check-trt"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 1)
        if opset > MAX_OPSET:
            raise PassError(f"check-trt: the model imports ONNX opset {opset}; TensorRT parses opset ≤ {MAX_OPSET} — "
                            "drop the newer ops or lower them in the recipe")
        for node in model.graph:
            self._check(model, node, opset)
        for function in model.functions.values():
            self.count("functions_checked")
            for node in function:
                self._check(model, node, function.opset_imports.get("", opset), where=f"function {function.name}")
        return ir.passes.PassResult(model, False)

    def _check(self, model: ir.Model, node: ir.Node, opset: int, where: str = "graph") -> None:
        self.count("nodes_checked")
        label = f"check-trt: node {node.name!r} ({node.domain + '::' if node.domain else ''}{node.op_type}, {where})"
        if node.domain not in ("", "ai.onnx"):
            return self._check_custom(model, node, label)
        if node.op_type not in SUPPORTED_OPS:
            raise PassError(f"{label}: {_why_unsupported(node.op_type, opset)}")
        for value in [*node.inputs, *node.outputs]:
            if value is not None and value.dtype is not None and value.dtype not in SUPPORTED_TYPES:
                raise PassError(f"{label}: tensor {value.name!r} is {value.dtype.name}, which TensorRT does not "
                                "take; cast it in the recipe")
        reason = _RULES.get(node.op_type, lambda n: None)(node)
        if reason:
            raise PassError(f"{label}: {reason}")

    def _check_custom(self, model: ir.Model, node: ir.Node, label: str) -> None:
        if (node.domain, node.op_type) != PLUGIN or "plugin_namespace" not in node.attributes:
            raise PassError(f"{label}: custom ops have no TensorRT importer ('Plugin not found'); lower it with "
                            "'lower-trt' or build with --attention plugin")
        if (node.domain, node.op_type, node.overload) not in model.functions:
            raise PassError(f"{label}: plugin node without its model-local function; rerun 'lower-trt' with "
                            "attention = \"plugin\" so TensorRT without the plugin can inline it")
        self.count("plugin_nodes")


def _why_unsupported(op: str, opset: int) -> str:
    try:
        onnx.defs.get_schema(op, MAX_OPSET, "")
    except onnx.defs.SchemaError:
        return (f"{op} is newer than ONNX opset {MAX_OPSET}, the highest TensorRT parses; rewrite it with "
                "opset-24 ops or leave it out of the trt recipe")
    return f"TensorRT's ONNX parser has no importer for {op}; rewrite it in supported ops"


def _attention(node: ir.Node) -> str | None:
    q = node.inputs[0]
    if q.dtype not in LOW_PRECISION:
        return (f"query is {q.dtype.name if q.dtype else 'untyped'}; TensorRT has no fused fp32 attention — "
                "build with --target trt (lower-trt dtype float16 or bfloat16)")
    if len(node.inputs) > 4 or len([o for o in node.outputs if o is not None and o.uses()]) > 1:
        return "Attention with past/present does not parse (one output only); write the cache with TensorScatter"
    softcap = node.attributes.get("softcap")
    if softcap is not None and softcap.value != 0.0:
        return "Attention with softcap does not parse; lower-trt writes softcapped attention as MatMul/Tanh/Softmax"
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    if mask is not None and mask.dtype not in (T.BOOL, q.dtype):
        return f"mask is {mask.dtype.name}; use a bool mask or the query's dtype"
    return None


def _quantize(node: ir.Node) -> str | None:
    scale = node.inputs[1]
    if const_array(scale) is None:
        return f"scale {scale.name!r} is not a constant; TensorRT needs constant Q/DQ scales (calibrate first)"
    if np.any(const_array(scale).astype(np.float32) <= 0):
        return f"scale {scale.name!r} has values ≤ 0, which TensorRT rejects; run 'lower-trt' (it makes them positive)"
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if zero is not None:
        array = const_array(zero)
        if array is None or np.any(array.astype(np.float32) != 0):
            return f"zero point {zero.name!r} is not a constant zero; TensorRT quantization is symmetric"
    return None


def _dequantize(node: ir.Node) -> str | None:
    reason = _quantize(node)
    data = node.inputs[0]
    if reason or (data.dtype or (data.const_value.dtype if data.const_value is not None else None)) != T.INT4:
        return reason
    if const_array(node.inputs[0]) is None:
        return "int4 DequantizeLinear of a non-constant; TensorRT takes int4 only as weight-only blocked DQ"
    if not attr(node, "block_size", 0):
        return "int4 DequantizeLinear without block_size; use blocked int4 weights (quantize-int4 block_size)"
    return None


_RULES = {"Attention": _attention, "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize}
