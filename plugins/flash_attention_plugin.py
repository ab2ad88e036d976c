"""The FlashAttention plugin node: what ``--attention plugin`` emits for TensorRT.

    graphopt::FlashAttention(q3, k3, v3, past_k, past_v, cache_lens)         (canonical, after insert-kv-cache)
        ─► graphopt::FlashAttention(…same inputs…) ─► o3, present_k, present_v
               attrs: num_heads, kv_num_heads, scale, causal, softcap, window,
                      plugin_namespace = "graphopt", plugin_version = "1"
           + model-local function graphopt::FlashAttention (one overload per distinct attribute set)
               body = the standard-op reference (TensorScatter-24 + Attention + cache_lens mask)

TensorRT with the plugin library loaded maps the node onto the registered ``graphopt::FlashAttention``
plugin (Triton kernel, ahead-of-time compiled); ONNX Runtime and TensorRT without the plugin inline
the function body instead, so the same artifact runs everywhere.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.plugins.flash_attention import ATTRIBUTES, DOMAIN, OP_TYPE, _expand, is_flash_attention

PLUGIN_NAMESPACE = "graphopt"
PLUGIN_VERSION = "1"
PLUGIN_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
_INPUTS = ("query", "key", "value", "past_key", "past_value", "cache_lens")
_OUTPUTS = ("output", "present_key", "present_value")


def kernel_supports(node: ir.Node) -> str | None:
    """None if the Triton kernel implements this node's attributes, else why not."""
    window = node.attributes.get("window")
    softcap = node.attributes.get("softcap")
    if window is not None and window.value > 0:
        return f"sliding window {window.value}"
    if softcap is not None and softcap.value != 0:
        return f"softcap {softcap.value}"
    return None


def wrap_as_plugin(model: ir.Model) -> int:
    """Mark every cached FlashAttention the kernel supports as a plugin node with a function body; returns how
    many (the others stay canonical for the caller to lower)."""
    overloads: dict[tuple, str] = {}
    count = 0
    for node in model.graph:
        if not is_flash_attention(node) or len(node.inputs) != 6 or kernel_supports(node) is not None:
            continue
        key = tuple((k, node.attributes[k].value) for k in ATTRIBUTES if k in node.attributes)
        if key not in overloads:
            overloads[key] = "" if not overloads else f"v{len(overloads)}"
            function = reference_function(node, overloads[key])
            model.functions[function.identifier()] = function
        node.overload = overloads[key]
        for name, value in PLUGIN_ATTRIBUTES.items():
            node.attributes[name] = ir.AttrString(name, value)
        count += 1
    if count:
        model.opset_imports[DOMAIN] = 1
        model.opset_imports[""] = max(model.opset_imports.get("", 24), 24)
    return count


def reference_function(node: ir.Node, overload: str = "") -> ir.Function:
    """A function ``graphopt::FlashAttention`` whose body is the standard-op expansion of ``node``."""
    inputs = [ir.Value(name=name, type=ir.TensorType(v.dtype), shape=v.shape)
              for name, v in zip(_INPUTS, node.inputs)]
    attributes = {k: a.value for k, a in node.attributes.items() if k in ATTRIBUTES}
    inner = ir.node(OP_TYPE, inputs, domain=DOMAIN, num_outputs=3, attributes=attributes)
    graph = ir.Graph(inputs, [], nodes=[inner], opset_imports={"": 24}, name=f"{OP_TYPE}{overload}")
    outputs = list(inner.outputs)
    for value, name in zip(outputs, _OUTPUTS):
        value.name = name
    graph.outputs.extend(outputs)
    _expand(graph, inner)
    for value, name in zip(graph.outputs, _OUTPUTS):
        value.name = name
    declared = [ir.Attr(k, a.type, a.value) for k, a in node.attributes.items() if k in ATTRIBUTES]
    declared += [ir.AttrString(k, v) for k, v in PLUGIN_ATTRIBUTES.items()]
    return ir.Function(DOMAIN, OP_TYPE, overload, graph=graph, attributes=declared)


def plugin_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes TensorRT would hand to the graphopt plugin (for the manifest and the engine build check)."""
    return [n for n in model.graph if is_flash_attention(n) and "plugin_namespace" in n.attributes]
