"""A deterministic cost model of an artifact's graph: bytes read and FLOPs per token, peak activation bytes.

The graph's symbolic dimensions are bound to two points and every value's shape is inferred (ONNX Runtime's
symbolic shape inference, which knows the com.microsoft ops); nothing is run, so the figures are exact for a
given graph and the gate can hold them to tight thresholds:

    prefill   batch 1, seq = P (the prompt), max_seq = P      (the cache holds exactly the prompt)
    decode    batch 1, seq = 1,              max_seq = T      (T = P + new tokens: the cache is full)
    num_logits = 1 in both (keep-logits: the last position only)

Figures (each also split by op type, ``domain::op`` as in the op counts):

    decode_weight_bytes      bytes of constants one decode step reads: initializers, and values computed from
                             initializers alone (ONNX Runtime folds those when it loads the graph, so such nodes
                             cost nothing per step and their outputs are weights; DequantizeLinear is never
                             folded, so a quantized weight counts as its packed bytes and scales). Each constant
                             counted once, at the most any node reads of it. A Gather / GatherBlockQuantized on
                             axis 0 reads only the rows it gathers (rows × row bytes, scales and zero points
                             alike); every other node reads the whole tensor. int4/uint4: half a byte each.
    decode_kv_bytes          bytes of the past_key / past_value inputs read by attention nodes (GroupQueryAttention,
                             Attention, MultiHeadAttention) in one decode step: their shape at max_seq = T.
    prefill_flops_per_token  FLOPs of the prefill point divided by P; decode_flops_per_token: the decode point's.
    prefill/decode_peak_activation_bytes
                             the most bytes of intermediate values alive at once, walking the nodes in graph order:
                             a value lives from the node that makes it to its last reader; graph inputs,
                             constants and the present_* outputs (the KV cache, counted above) are excluded.

FLOPs per node (a multiply-add is 2):

    MatMul, Gemm, MatMulNBits      2 · (output elements) · K
    GroupQueryAttention, Attention, MultiHeadAttention
                                   4 · (output 0 elements) · L: Q·Kᵀ and P·V over all L cached positions, where
                                   L = the present key's sequence length (the dense rectangle; masking not subtracted)
    elementwise ops (Add, Mul, …)  1 per output element (Softmax 5, RotaryEmbedding 3)
    normalizations                 per input element: (Simplified)LayerNorm / RMSNormalization 4 (LayerNormalization 7),
                                   the Skip… forms one more for the residual add
    reductions                     1 per input element
    data movement (Gather, Reshape, Transpose, Cast, Concat, Slice, Where, …): 0
Any other op whose output is floating point is listed in ``uncounted_ops`` rather than silently taken as 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.evaluate.gate import COST_KEYS, CompareError

MATMULS = {"MatMul", "Gemm", "MatMulNBits"}
ATTENTION = {"GroupQueryAttention", "Attention", "MultiHeadAttention"}
PER_OUTPUT = {op: 1 for op in ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Exp", "Log",
                               "Tanh", "Sigmoid", "Erf", "Relu", "Gelu", "FastGelu", "Cos", "Sin", "Abs", "Max",
                               "Min", "QuickGelu", "Silu", "Softplus", "Clip")} | {"Softmax": 5, "RotaryEmbedding": 3}
PER_INPUT = {"SimplifiedLayerNormalization": 4, "RMSNormalization": 4, "SkipSimplifiedLayerNormalization": 5,
             "LayerNormalization": 7, "SkipLayerNormalization": 8, "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1,
             "ReduceMin": 1, "ReduceSumSquare": 2, "ReduceL2": 2}
NO_FLOPS = {"Gather", "GatherND", "GatherElements", "GatherBlockQuantized", "Reshape", "Transpose", "Cast", "Concat",
            "Slice", "Split", "Squeeze", "Unsqueeze", "Expand", "Where", "Shape", "Identity", "Constant", "Range",
            "ScatterND", "ScatterElements", "TensorScatter", "Tile", "Trilu", "Equal", "Less", "Greater",
            "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "IsNaN", "Size", "ConstantOfShape", "Flatten",
            "ArgMax", "TopK", "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "CumSum"}
KEPT = {"DequantizeLinear"}  # never constant-folded by ONNX Runtime
HALF_BYTE = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1}
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def cost_model(model_path: Path, prompt_tokens: int, context: int) -> dict[str, Any]:
    """The figures of the module docstring for ``model_path`` (model.onnx; external data is not read)."""
    if not 1 <= prompt_tokens <= context:
        raise CompareError(f"cost model: prompt tokens {prompt_tokens} and context {context} need 1 ≤ P ≤ T")
    proto = onnx.load(str(model_path), load_external_data=False)
    weights = {t.name for t in proto.graph.initializer}
    _externals_as_inputs(proto)
    prefill = _point(proto, weights, {"batch": 1, "seq": prompt_tokens, "max_seq": prompt_tokens, "num_logits": 1})
    decode = _point(proto, weights, {"batch": 1, "seq": 1, "max_seq": context, "num_logits": 1})
    by_op: dict[str, dict[str, float]] = defaultdict(dict)
    for key, per_op, scale in (("decode_weight_bytes", decode.weights, 1), ("decode_kv_bytes", decode.kv, 1),
                               ("prefill_flops_per_token", prefill.flops, prompt_tokens),
                               ("decode_flops_per_token", decode.flops, 1)):
        for op, value in per_op.items():
            by_op[op][key] = _number(value / scale)
    totals = {"decode_weight_bytes": sum(decode.weights.values()), "decode_kv_bytes": sum(decode.kv.values()),
              "prefill_flops_per_token": _number(sum(prefill.flops.values()) / prompt_tokens),
              "decode_flops_per_token": sum(decode.flops.values()),
              "prefill_peak_activation_bytes": prefill.peak, "decode_peak_activation_bytes": decode.peak}
    return {"at": {"batch": 1, "prompt_tokens": prompt_tokens, "context": context}, **{k: totals[k] for k in COST_KEYS},
            "by_op": {op: by_op[op] for op in sorted(by_op)},
            "uncounted_ops": sorted(set(prefill.uncounted) | set(decode.uncounted))}


class _Point:
    """One binding's shapes and the figures counted on them."""

    def __init__(self) -> None:
        self.weights: dict[str, int] = defaultdict(int)
        self.kv: dict[str, int] = defaultdict(int)
        self.flops: dict[str, int] = defaultdict(int)
        self.peak = 0
        self.uncounted: set[str] = set()


def _externals_as_inputs(proto: onnx.ModelProto) -> None:
    """Initializers whose bytes are in model.onnx.data (not loaded) become typed graph inputs, so that shape
    inference never reads them (they are still counted as weights)."""
    graph = proto.graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in external:
        graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    inline = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    del graph.initializer[:]
    graph.initializer.extend(inline)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's symbolic shape inference (it knows the com.microsoft ops), with GatherND's batch_dims
    and GatherBlockQuantized's packed int4 rows honoured (ORT 1.32's rules get both wrong), and no temporary
    file written when inference is incomplete. Assumes gather axis 0, as graphopt's quantizers write."""
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference, get_attribute

    class Shapes(SymbolicShapeInference):
        def __init__(self) -> None:
            super().__init__(2**31 - 1, False, False, 0)
            self.dispatcher_["GatherND"] = self._gather_nd
            self.dispatcher_["GatherBlockQuantized"] = self._gather_block_quantized

        def _gather_nd(self, node: onnx.NodeProto) -> None:
            data, indices = self._get_shape(node, 0), self._get_shape(node, 1)
            batch = get_attribute(node, "batch_dims", 0)
            elem = self.known_vi_[node.input[0]].type.tensor_type.elem_type
            shape = indices[:-1] + data[batch + indices[-1]:]
            self.known_vi_[node.output[0]].CopyFrom(helper.make_tensor_value_info(node.output[0], elem, shape))

        def _gather_block_quantized(self, node: onnx.NodeProto) -> None:
            data, indices = self._get_shape(node, 0), self._get_shape(node, 1)
            packed = self.known_vi_[node.input[0]].type.tensor_type.elem_type == onnx.TensorProto.UINT8
            per_byte = 8 // get_attribute(node, "bits", 4) if packed else 1  # uint8 data: 2 int4 a byte
            shape = indices + data[1:-1] + [data[-1] * per_byte]
            elem = self.known_vi_[node.input[2]].type.tensor_type.elem_type  # the scales' type
            self.known_vi_[node.output[0]].CopyFrom(helper.make_tensor_value_info(node.output[0], elem, shape))

    shapes = Shapes()
    shapes._preprocess(model)
    complete = False
    while shapes.run_:
        complete = shapes._infer_impl()
    shapes._update_output_from_vi()
    if not complete:
        raise CompareError("cost model: shape inference could not finish on this graph; it has an op ONNX Runtime's "
                           "symbolic shape inference does not know")
    return shapes.out_mp_


def _point(proto: onnx.ModelProto, weights: set[str], dims: dict[str, int]) -> _Point:
    bound = onnx.ModelProto()
    bound.CopyFrom(proto)
    for value in list(bound.graph.input) + list(bound.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param:
                if dim.dim_param not in dims:
                    raise CompareError(f"cost model: {value.name} has the dimension {dim.dim_param!r}, not one of "
                                       f"{sorted(dims)}; only artifacts of the graphopt contract can be costed")
                dim.dim_value = dims[dim.dim_param]
    del bound.graph.value_info[:]
    inferred = _infer(bound)
    tensors = _tensors(inferred.graph)
    constants = _constants(inferred.graph, weights)
    point = _Point()
    _count_weights(inferred.graph, tensors, constants, point)
    for node in inferred.graph.node:
        if not all(name in constants for name in node.output if name):
            _count_node(node, tensors, point)
    point.peak = _peak(inferred.graph, tensors, constants)
    return point


def _tensors(graph: onnx.GraphProto) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (element type, concrete shape) for every value and initializer."""
    out = {t.name: (t.data_type, tuple(t.dims)) for t in graph.initializer}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        kind = value.type.tensor_type
        if kind.elem_type == onnx.TensorProto.UNDEFINED:  # an optional output nobody reads (e.g. a norm's mean)
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim)
        if -1 in dims:
            raise CompareError(f"cost model: the shape of {value.name} could not be inferred ({dims}); "
                               "the graph has an op shape inference does not know")
        out.setdefault(value.name, (kind.elem_type, dims))
    return out


def _bytes(elem_type: int, shape: tuple[int, ...]) -> int:
    count = math.prod(shape)
    if elem_type in HALF_BYTE:
        return (count + 1) // 2
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def _op(node: onnx.NodeProto) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def _constants(graph: onnx.GraphProto, weights: set[str]) -> set[str]:
    """Initializers and every value computed from initializers alone (ONNX Runtime folds those at load),
    except through DequantizeLinear, which ORT keeps (to fuse it into MatMulNBits or run it per step)."""
    known = set(weights)
    for node in graph.node:
        if node.op_type not in KEPT and all(name in known for name in node.input if name):
            known.update(name for name in node.output if name)
    return known


def _count_weights(graph: onnx.GraphProto, tensors: dict, constants: set[str], point: _Point) -> None:
    """Each constant once, at the most any (non-folded) node reads of it (row gathers read rows only)."""
    most: dict[str, tuple[int, str]] = {}
    for node in graph.node:
        if all(name in constants for name in node.output if name):
            continue  # folded at load
        rows = _gathered_rows(node, tensors)
        for position, name in enumerate(node.input):
            if name not in constants or name not in tensors:
                continue
            elem, shape = tensors[name]
            size = _bytes(elem, shape)
            if rows is not None and position != 1 and shape:  # data / scales / zero points, not the indices
                size = size // shape[0] * rows
            if size > most.get(name, (-1, ""))[0]:
                most[name] = (size, _op(node))
    for size, op in most.values():
        point.weights[op] += size


def _gathered_rows(node: onnx.NodeProto, tensors: dict) -> int | None:
    if node.op_type not in ("Gather", "GatherBlockQuantized"):
        return None
    axis = next((a.i for a in node.attribute if a.name in ("axis", "gather_axis")), 0)
    return math.prod(tensors[node.input[1]][1]) if axis == 0 else None


def _count_node(node: onnx.NodeProto, tensors: dict, point: _Point) -> None:
    op, kind = _op(node), node.op_type
    out_elems = math.prod(tensors[node.output[0]][1]) if node.output and node.output[0] in tensors else 0
    if kind in MATMULS:
        k = next((a.i for a in node.attribute if a.name == "K"), None) or tensors[node.input[0]][1][-1]
        point.flops[op] += 2 * out_elems * k
    elif kind in ATTENTION:
        present = [tensors[name] for name in node.output[1:3] if name]
        past = [tensors[name] for name in node.input[3:5] if name]
        length = present[0][1][-2] if present else tensors[node.input[1]][1][-2]
        point.flops[op] += 4 * out_elems * length
        point.kv[op] += sum(_bytes(elem, shape) for elem, shape in past)
    elif kind in PER_OUTPUT:
        point.flops[op] += PER_OUTPUT[kind] * out_elems
    elif kind in PER_INPUT:
        point.flops[op] += PER_INPUT[kind] * math.prod(tensors[node.input[0]][1])
    elif kind not in NO_FLOPS and node.output and tensors.get(node.output[0], (0,))[0] in FLOATS:
        point.uncounted.add(op)


def _peak(graph: onnx.GraphProto, tensors: dict, constants: set[str]) -> int:
    """Most bytes of intermediate values alive at once, nodes in graph order."""
    skip = constants | {v.name for v in graph.input}
    skip |= {v.name for v in graph.output if v.name.startswith("present_")}
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = index
    for value in graph.output:
        last_use[value.name] = len(graph.node)
    live, peak = 0, 0
    for index, node in enumerate(graph.node):
        made = [name for name in node.output if name in tensors and name not in skip]
        live += sum(_bytes(*tensors[name]) for name in made)
        peak = max(peak, live)
        dead = {name for name in set(node.input) | set(made)
                if name in tensors and name not in skip and last_use.get(name, index) <= index}
        live -= sum(_bytes(*tensors[name]) for name in dead)
    return peak


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(float(value), 3)
