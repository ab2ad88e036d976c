"""lower-verify: GroupQueryAttention → standard TensorScatter + Attention, for multi-token steps over a cache.

On the CPU EP ``com.microsoft.GroupQueryAttention`` refuses B > 1 rows of S > 1 tokens when a cache exists
(seen with ONNX Runtime 1.32), which is exactly a batched speculative verification (k+1 tokens per row) or
a ragged chunked prefill. This pass rewrites a lowered ort-cpu graph into a second graph for those steps, with the
same I/O contract; the build saves it as ``model_verify.onnx`` beside ``model.onnx``, sharing
``model.onnx.data`` (its weights are never read here: the model may be loaded lazily)::

    before:  GroupQueryAttention(qkv | q,k,v, past_k, past_v, seqlens_k, total_seq [, cos, sin, pos])
                 ─► o3, present_k, present_v                                  (present = past, in place)
    after:   [Split(qkv) ─► q3, k3, v3]                                        (packed QKV)
             [RotaryEmbedding-23(q3 | k3, cos, sin, pos)]                      (do_rotary = 1)
             TensorScatter-24(past_k, K_BHSD, cache_lens, axis=-2) ─► present_k    (same for v; in place)
             Slice(present_k, [0, T) on axis 2) ─► K_used  [B,Hkv,T,D]       T = total_seq = max(cache_lens)+S
             Attention(Q_BHSD, K_used, V_used, mask[B,1,S,T], softcap) ─► O_BHSD ─► o3 [B,S,H·D]
             (with head_sink: FlashAttention's standard-op sink reference in place of Attention)
             mask (built once per window size): key t visible to query j of row b iff t ≤ cache_lens[b]+j
                  (and t > cache_lens[b]+j-window with a sliding window)

Attention reads only the first T cache positions, so its cost follows the used length, not max_seq.
(Attention-24's ``nonpad_kv_seqlen`` over the whole cache, without the Slice, is exact too, but ORT 1.32's
CPU kernel still computes over every cache position: measured on SmolLM2 with a 2048-position cache, k = 4,
batch 8, 156 ms against 77 ms with the Slice.)
Padded queries (j ≥ input_lens[b]) write K/V past the row's length, where cache_lens says nothing is
valid; each of them sees at least one key (t ≤ cache_lens[b]+j < T always holds), so no row is all masked.
Letters: B batch, S new tokens, T keys attended, H/Hkv query/kv heads, D head dim.

Statistics: ``standard_attention`` (nodes rewritten), ``packed_qkv_split``, ``rope_unfused``, ``masks``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._edit import attr, static_dim
from graphopt.passes.base import GraphoptPass
from graphopt.plugins.flash_attention import annotate_dtypes, decomposed_attention, cache_mask

MS_DOMAIN = "com.microsoft"
OPSET = 24  # TensorScatter
VERIFY_FILE = "model_verify.onnx"
GRAPHS_KEY = "multi_token"  # manifest "graphs": {"multi_token": "model_verify.onnx"}
_SUPPORTED = {"num_heads", "kv_num_heads", "scale", "softcap", "local_window_size", "do_rotary",
              "rotary_interleaved"}
_FIX = "build without it: the runtime then verifies speculative rows one call each"


def is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN


class LowerVerifyPass(GraphoptPass):
    """GroupQueryAttention → RoPE + TensorScatter + Slice + Attention (multi-row multi-token steps)."""

    name = "lower-verify"

    def requires(self, model: ir.Model) -> None:
        names = {v.name for v in model.graph.inputs}
        missing = {"input_ids", "position_ids", "cache_lens"} - names
        if missing and any(is_gqa(n) for n in model.graph):
            raise ir.passes.PreconditionError(f"lower-verify: inputs {sorted(missing)} are missing; run "
                                              "'insert-kv-cache' first")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if is_gqa(n)]
        if not nodes:
            return ir.passes.PassResult(model, False)
        for node in nodes:
            reason = unsupported(node)
            if reason:
                raise PassError(f"lower-verify: GroupQueryAttention {node.name!r} {reason}; {_FIX}")
        inputs = {v.name: v for v in graph.inputs}
        write = ir.node("Cast", [inputs["cache_lens"]], attributes={"to": ir.DataType.INT64}, name="write_indices")
        write.outputs[0].dtype, write.outputs[0].name = ir.DataType.INT64, "write_indices"
        graph.insert_before(nodes[0], write)
        masks: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        for node in nodes:
            self._lower(graph, node, inputs, write.outputs[0], masks)
        model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
        ir.passes.common.RemoveUnusedNodesPass()(model)  # seqlens_k's arithmetic
        return ir.passes.PassResult(model, bool(nodes))

    def _lower(self, graph: ir.Graph, node: ir.Node, inputs: dict[str, ir.Value], write: ir.Value,
               masks: dict) -> None:
        heads, kv_heads = int(attr(node, "num_heads")), int(attr(node, "kv_num_heads"))
        dim = static_dim(node.inputs[3], 3)
        window = int(attr(node, "local_window_size", -1))
        tape = ir.tape.Tape()
        query, key, value = self._qkv(tape, node, heads, kv_heads, dim)
        if attr(node, "do_rotary", 0):
            query, key = self._rope(tape, node, inputs, (query, heads), (key, kv_heads), dim=dim)
        used, mask = self._mask(graph, node, inputs["input_ids"], write, masks, window)
        presents, visible = [], []
        for new, past in ((key, node.inputs[3]), (value, node.inputs[4])):
            update = tape.op("Transpose", [tape.op("Reshape", [new, _ints(tape, [0, 0, kv_heads, dim])])],
                             attributes={"perm": [0, 2, 1, 3]})
            presents.append(tape.op("TensorScatter", [past, update, write], attributes={"axis": -2}))
            visible.append(tape.op("Slice", [presents[-1], _ints(tape, [0]), used, _ints(tape, [2])]))
        q4 = tape.op("Transpose", [tape.op("Reshape", [query, _ints(tape, [0, 0, heads, dim])])],
                     attributes={"perm": [0, 2, 1, 3]})
        scale = float(attr(node, "scale", 0.0))  # GQA's 0 means 1/sqrt(D), Attention's default
        softcap = float(attr(node, "softcap", 0.0))
        sinks = node.inputs[11] if len(node.inputs) > 11 else None
        if sinks is not None:
            self.count("head_sink")
            options = {"q_num_heads": heads, "kv_num_heads": kv_heads, "head_dim": dim,
                       "scale": scale or 1.0 / float(np.sqrt(dim)), "softcap": softcap}
            out4 = decomposed_attention(tape, q4, visible, mask, sinks, options)
        else:
            options = ({"scale": scale} if scale else {}) | ({"softcap": softcap} if softcap else {})
            out4 = tape.op("Attention", [q4, *visible, mask], attributes=options)
        out3 = tape.op("Reshape", [tape.op("Transpose", [out4], attributes={"perm": [0, 2, 1, 3]}),
                                   _ints(tape, [0, 0, heads * dim])])
        annotate_dtypes(tape.nodes)
        graph.insert_before(node, tape.nodes)
        for old, new in zip(node.outputs, [out3, *presents]):
            new.shape, new.dtype = old.shape, old.dtype
            if old.is_graph_output():  # keep the contract's names (present_key.i …)
                new.name, old.name = old.name, f"{old.name}__gqa"
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        self.count("standard_attention")

    def _mask(self, graph: ir.Graph, node: ir.Node, input_ids: ir.Value, write: ir.Value, masks: dict,
              window: int) -> tuple[ir.Value, ir.Value]:
        """(T as int64 [1], mask [B,1,S,T]), built once per graph and window size, before its first reader."""
        total = node.inputs[6]  # GQA's total_sequence_length: max(cache_lens) + S, int32 scalar
        if (id(total), window) not in masks:
            once = ir.tape.Tape()
            used = once.op("Unsqueeze", [once.op("Cast", [total], attributes={"to": ir.DataType.INT64}),
                                         _ints(once, [0])])
            masks[id(total), window] = (used, cache_mask(once, write, input_ids, used, window))
            annotate_dtypes(once.nodes)
            graph.insert_before(node, once.nodes)
            self.count("masks")
        return masks[id(total), window]

    def _qkv(self, tape: ir.tape.Tape, node: ir.Node, heads: int, kv_heads: int, dim: int):
        """q3, k3, v3 [B,S,·]: the GQA inputs, or a Split of the packed projection."""
        query, key, value = node.inputs[:3]
        if key is not None:
            return query, key, value
        sizes = _ints(tape, [heads * dim, kv_heads * dim, kv_heads * dim])
        self.count("packed_qkv_split")
        parts = tape.op_multi_out("Split", [query, sizes], attributes={"axis": -1}, num_outputs=3)
        for part in parts:
            part.dtype = query.dtype
        return parts

    def _rope(self, tape: ir.tape.Tape, node: ir.Node, inputs: dict[str, ir.Value], *pairs, dim: int):
        """RotaryEmbedding-23 on q and k at ``position_ids`` with the GQA's own cos/sin caches [P, R/2]."""
        cos, sin = node.inputs[7], node.inputs[8]
        positions = node.inputs[9] if len(node.inputs) > 9 and node.inputs[9] is not None else inputs["position_ids"]
        half = static_dim(cos, 1)
        out = []
        for x, num_heads in pairs:
            attributes = {"num_heads": num_heads, "interleaved": int(attr(node, "rotary_interleaved", 0))}
            if half is not None and 2 * half != dim:
                attributes["rotary_embedding_dim"] = 2 * half
            out.append(tape.op("RotaryEmbedding", [x, cos, sin, positions], attributes=attributes))
            self.count("rope_unfused")
        return out


def unsupported(node: ir.Node) -> str | None:
    """Why ``node`` cannot be rewritten here (None when it can)."""
    extra = sorted(set(node.attributes) - _SUPPORTED)
    if extra:
        return f"has attributes {extra} this lowering does not implement"
    if (len(node.inputs) > 10 and node.inputs[10] is not None) or any(v is not None for v in node.inputs[12:]):
        return "has an attention_bias or quantization input"
    if len(node.inputs) < 7 or node.inputs[3] is None or static_dim(node.inputs[3], 3) is None:
        return "has no past cache with a static head dimension"
    if attr(node, "do_rotary", 0) and (len(node.inputs) < 9 or node.inputs[7] is None):
        return "has do_rotary = 1 but no cos/sin caches"
    return None


def write_verify_graph(artifact: Path) -> Path:
    """Load ``artifact``/model.onnx without reading its weights, lower it, and save ``model_verify.onnx``
    beside it; its initializers keep pointing into model.onnx.data (nothing is copied)."""
    model = ir.load(artifact / "model.onnx")
    LowerVerifyPass()(model)
    path = artifact / VERIFY_FILE
    ir.save(model, path)
    return path


def _ints(tape: ir.tape.Tape, values) -> ir.Value:
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))})
