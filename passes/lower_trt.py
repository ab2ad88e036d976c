"""lower-trt: the canonical graph in the form TensorRT's ONNX parser accepts.

    FlashAttention(q3,k3,v3,past_k,past_v,cache_lens) ─► o3, present_k, present_v
        ─► attention = "standard":  TensorScatter-24(past_k, K_BHSD, cache_lens) ─► present_k   (same for v)
                                    Attention(Q_BHSD, present_k, present_v, mask[B,1,S,T] bool) ─► o3
                                    mask: key t visible to query j of row b iff t ≤ cache_lens[b]+j
                                    (softcap or sinks: MatMul/Tanh/Softmax in place of Attention, whose
                                    TensorRT importer refuses softcap)
        ─► attention = "plugin":    graphopt::FlashAttention(…, plugin_namespace="graphopt", plugin_version="1")
                                    + a model-local function graphopt::FlashAttention whose body is the
                                    standard form above (ORT, and TensorRT without the plugin, inline it)
    float32 everywhere ─► ``dtype`` (float16 | bfloat16): weights, activations, caches, Q/DQ scales
        positions (RoPE cos/sin from position_ids) stay float32 and are Cast at the border — fp16
        cannot hold position·inv_freq for long contexts
        logits ─► Cast(float32) ─► logits                       (the I/O contract keeps float32 logits)

TensorRT 11 is strongly typed and has no fused fp32 attention, hence the explicit casts; its KV-cache
update layer needs a static cache length, so T becomes a number (``max_seq``). The graph's opset
becomes 24 (TensorScatter). Letters: B batch, S new tokens, T cache capacity
(max_seq), H/Hkv query/kv heads, D head dim.
Options: ``dtype`` "float16" (default) | "bfloat16"; ``attention`` "standard" (default) | "plugin";
``max_seq`` T, the static cache capacity (0 = the model's context length, at most DEFAULT_MAX_SEQ);
``max_batch``, ``max_prefill``, ``max_verify``: the optimization profiles' ranges (rows; tokens per
prefill call; tokens and logit rows per decode/verify call), recorded for the manifest.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import record_precision
from graphopt.passes.base import GraphoptPass
from graphopt.plugins.flash_attention import annotate_dtypes, expand_reference, has_cache, is_flash_attention

DTYPES = {"float16": (ir.DataType.FLOAT16, np.float16), "bfloat16": (ir.DataType.BFLOAT16, ml_dtypes.bfloat16)}
ATTENTION = ("standard", "plugin")
OPSET = 24
DEFAULT_MAX_SEQ = 4096
_POSITION_INPUTS = ("position_ids",)


class LowerTrtPass(GraphoptPass):
    """FlashAttention → TensorScatter + Attention (or the plugin node); fp32 → fp16/bf16 with casts."""

    name = "lower-trt"
    lossy = True  # fp32 → fp16/bf16: --verify records the change instead of holding it to 1e-4

    def __init__(self, dtype: str = "float16", attention: str = "standard", max_seq: int = 0, max_batch: int = 8,
                 max_prefill: int = 512, max_verify: int = 8) -> None:
        super().__init__()
        self.dtype = dtype
        self.attention = attention
        self.max_seq = max_seq
        self.profile_ranges = {"max_batch": max_batch, "max_prefill": max_prefill, "max_verify": max_verify}

    def requires(self, model: ir.Model) -> None:
        if self.dtype not in DTYPES:
            raise PassError(f"lower-trt: dtype {self.dtype!r} cannot run TensorRT's fused attention; "
                            f"use one of {list(DTYPES)}")
        if self.max_seq < 0:
            raise PassError(f"lower-trt: max_seq {self.max_seq} is negative; use 0 (the model's context) or a length")
        bad = {k: v for k, v in self.profile_ranges.items() if v < 1}
        if bad:
            raise PassError(f"lower-trt: profile ranges {bad} must be ≥ 1; raise them")
        if self.attention not in ATTENTION:
            raise PassError(f"lower-trt: attention {self.attention!r} is unknown; use one of {list(ATTENTION)}")
        attention = [n for n in model.graph if is_flash_attention(n)]
        if not attention or not all(has_cache(n) for n in attention):
            raise ir.passes.PreconditionError(
                "lower-trt: no FlashAttention with cache inputs; run 'fuse-attention' and 'insert-kv-cache' first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from graphopt.plugins.flash_attention_plugin import kernel_supports, wrap_as_plugin

        self._static_capacity(model.graph)
        self.context.results.trt_profiles = dict(self.profile_ranges)
        if self.attention == "plugin":
            self.count("plugin_attention", wrap_as_plugin(model))
            for node in model.graph:
                if is_flash_attention(node) and "plugin_namespace" not in node.attributes:
                    self.note(f"lower-trt: {node.name!r} lowered to standard ops: the plugin kernel has no "
                              f"{kernel_supports(node)}")
        self.count("standard_attention", expand_reference(model, keep=lambda n: "plugin_namespace" in n.attributes,
                                                          softcap_in_attention=False))
        model.opset_imports[""] = OPSET
        annotate_dtypes(model.graph)
        target, np_type = DTYPES[self.dtype]
        self._flip_negative_scales(model.graph)
        self._convert(model.graph, target, np_type)
        for function in model.functions.values():
            self._convert(function, target, np_type, keep=set())
        self._positive_scales(model.graph, np_type)
        self._float_logits(model.graph)
        short = {"float16": "fp16", "bfloat16": "bf16"}[self.dtype]
        recorded = dict(self.context.results.precision)
        record_precision(self.context, weights=recorded.get("weights", short), activations=recorded.get("activations", short),
                         compute=short)
        return ir.passes.PassResult(model, True)

    def _static_capacity(self, graph: ir.Graph) -> None:
        """past/present [B,Hkv,T,D] with T a number: TensorRT's KV-cache update needs it static."""
        capacity = self.max_seq or min(self.context.max_positions or DEFAULT_MAX_SEQ, DEFAULT_MAX_SEQ)
        for value in [*graph.inputs, *graph.outputs]:
            if value.name.startswith(("past_", "present_")) and value.shape is not None and len(value.shape) == 4:
                batch, heads, _, dim = value.shape
                value.shape = ir.Shape([batch, heads, capacity, dim])
        self.count("cache_capacity", capacity)

    def _convert(self, graph, target: ir.DataType, np_type, keep: set[int] | None = None) -> None:
        """Every float32 tensor except the position region becomes ``target``; casts at the border."""
        keep = _position_region(graph) if keep is None else keep
        for value in _graph_values(graph):
            if value.dtype == ir.DataType.FLOAT and id(value) not in keep:
                self._retype(graph, value, target, np_type)
        for node in list(graph):
            if id(node) in keep:
                continue
            self._retype_node_attrs(node, target, np_type)
            for i, value in enumerate(node.inputs):
                if value is not None and id(value) in keep and value.dtype == ir.DataType.FLOAT:
                    node.replace_input_with(i, _cast_of(graph, value, target))
                    self.count("border_casts")

    def _retype(self, graph, value: ir.Value, target: ir.DataType, np_type) -> None:
        if value.const_value is not None:
            array = value.const_value.numpy().astype(np_type)
            value.const_value = ir.Tensor(array, dtype=target, name=value.name)
            self.count("weights_converted")
        value.dtype = target

    def _retype_node_attrs(self, node: ir.Node, target: ir.DataType, np_type) -> None:
        to = node.attributes.get("to")
        if node.op_type == "Cast" and to is not None and to.value == ir.DataType.FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", target)
            self.count("casts_retargeted")
        for key in ("value",):
            attr = node.attributes.get(key)
            if attr is not None and attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT:
                array = attr.value.numpy().astype(np_type)
                node.attributes[key] = ir.AttrTensor(key, ir.Tensor(array, dtype=target))
                self.count("constants_converted")

    def _flip_negative_scales(self, graph: ir.Graph) -> None:
        """A weight DQ with negative scales (a GGUF's Q4_0/Q5_0/Q6_K keep their sign in d): negate those
        blocks' q and scale — the same values — widening int4 to int8 where a -8 would become 8."""
        for node in graph:
            if node.op_type != "DequantizeLinear" or len(node.inputs) > 2 or node.inputs[0].const_value is None \
                    or node.inputs[1].const_value is None:
                continue
            scale = node.inputs[1].const_value.numpy().astype(np.float32)
            if not np.any(scale < 0):
                continue
            q = node.inputs[0].const_value.numpy().astype(np.int16)
            axis, block = node.attributes["axis"].value if "axis" in node.attributes else 1, \
                node.attributes["block_size"].value if "block_size" in node.attributes else 0
            sign = np.repeat(np.where(scale < 0, -1, 1), block, axis=axis) if block else np.where(scale < 0, -1, 1)
            q = q * sign
            wide = node.inputs[0].dtype == ir.DataType.INT4 and q.max() > 7
            dtype = ir.DataType.INT8 if wide or node.inputs[0].dtype == ir.DataType.INT8 else ir.DataType.INT4
            name = node.inputs[0].name
            node.inputs[0].const_value = ir.Tensor(q.astype(np.int8), dtype=dtype, name=name)
            node.inputs[0].dtype = dtype
            node.inputs[1].const_value = ir.tensor(np.abs(scale), name=node.inputs[1].name)
            self.count("negative_scales_flipped")
            if wide:
                self.count("int4_widened_to_int8")

    def _positive_scales(self, graph: ir.Graph, np_type) -> None:
        """TensorRT rejects a Q/DQ scale ≤ 0: an all-zero block (the pad token's embedding row) has scale 0,
        and fp16 can flush a tiny one to 0; any positive scale gives the same zeros, so use the smallest normal."""
        tiny = float(np.finfo(np.float16).tiny) if np_type is np.float16 else 1e-30
        for node in graph:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.inputs[1].const_value is None:
                continue
            scale = node.inputs[1].const_value.numpy()
            if np.all(scale.astype(np.float32) > 0):
                continue
            fixed = np.maximum(scale.astype(np.float32), tiny).astype(np_type)
            node.inputs[1].const_value = ir.Tensor(fixed, dtype=node.inputs[1].dtype, name=node.inputs[1].name)
            self.count("scales_made_positive", int(np.sum(scale.astype(np.float32) <= 0)))

    def _float_logits(self, graph: ir.Graph) -> None:
        for i, out in enumerate(graph.outputs):
            if out.name == "logits" and out.dtype != ir.DataType.FLOAT:
                cast = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT}, name="logits_to_float32")
                graph.append(cast)
                new = cast.outputs[0]
                new.shape, new.dtype = out.shape, ir.DataType.FLOAT
                out.name, new.name = "logits_lowp", "logits"
                graph.outputs[i] = new
                self.count("logits_cast")
        for out in graph.outputs:
            if out.name == "logits":
                return
        raise PassError("lower-trt: the graph has no 'logits' output; run 'keep-logits' before it")


def _graph_values(graph) -> list[ir.Value]:
    seen: dict[int, ir.Value] = {}
    for value in [*graph.inputs, *getattr(graph, "initializers", {}).values()]:
        seen[id(value)] = value
    for node in graph:
        for value in [*node.inputs, *node.outputs]:
            if value is not None:
                seen.setdefault(id(value), value)
    return list(seen.values())


def _position_region(graph: ir.Graph) -> set[int]:
    """ids of the nodes and values computed from position_ids and constants alone (RoPE's cos/sin
    tables), plus the constant-only nodes and initializers that feed them."""
    hot = {id(v) for v in graph.inputs if v.name not in _POSITION_INPUTS}
    cold = {id(v) for v in graph.inputs if v.name in _POSITION_INPUTS}
    nodes = list(graph)
    region: set[int] = set()
    for node in nodes:  # graph order is topological
        ins = [id(v) for v in node.inputs if v is not None]
        if any(i in hot for i in ins):
            hot.update(id(v) for v in node.outputs)
        elif any(i in cold for i in ins):
            cold.update(id(v) for v in node.outputs)
            region.add(id(node))
    for node in reversed(nodes):  # constant-only producers whose results reach the region
        if id(node) not in region and not any(id(v) in hot or id(v) in cold for v in node.inputs if v is not None) \
                and any(id(use.node) in region for out in node.outputs for use in out.uses()):
            region.add(id(node))
    values = {id(v) for n in nodes if id(n) in region for v in n.outputs}
    values |= {id(v) for v in graph.initializers.values() if any(id(u.node) in region for u in v.uses())}
    return region | values


def _cast_of(graph: ir.Graph, value: ir.Value, target: ir.DataType) -> ir.Value:
    """One Cast(value → target) per value, placed right after its producer."""
    for use in value.uses():
        node = use.node
        if node.op_type == "Cast" and node.name == f"{value.name}_to_lowp":
            return node.outputs[0]
    cast = ir.node("Cast", [value], attributes={"to": target}, name=f"{value.name}_to_lowp")
    cast.outputs[0].dtype, cast.outputs[0].shape = target, value.shape
    cast.outputs[0].name = f"{value.name}_lowp"
    producer = value.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, cast)
    else:
        graph.insert_before(graph.node(0), cast)
    return cast.outputs[0]
