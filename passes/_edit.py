"""Small onnx-ir helpers for the passes: follow producers, read constants, build nodes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir


def producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    """The node producing ``value`` if it is ``domain::op_type``, else None."""
    if value is None:
        return None
    node = value.producer()
    if node is None or node.op_type != op_type or node.domain not in (domain, "ai.onnx" if domain == "" else domain):
        return None
    return node


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or Constant output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain == "":
        attr = node.attributes.get("value")
        if attr is not None:
            return attr.value.numpy()
    return None


def scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def perm_is(node: ir.Node | None, perm: Sequence[int]) -> bool:
    return node is not None and tuple(attr(node, "perm", ())) == tuple(perm)


def static_dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or len(value.shape) <= abs(axis) - (axis < 0):
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else None


def only_consumer(value: ir.Value) -> ir.Node | None:
    users = value.uses()
    nodes = {id(use.node): use.node for use in users}
    if len(nodes) != 1 or value.is_graph_output():
        return None
    return next(iter(nodes.values()))


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Add (or reuse, when the name exists with equal contents) a constant initializer."""
    existing = graph.initializers.get(name)
    if existing is not None and existing.const_value is not None:
        if np.array_equal(existing.const_value.numpy(), array):
            return existing
        name = f"{name}_{len(graph.initializers)}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def insert_before(graph: ir.Graph, anchor: ir.Node, nodes: Sequence[ir.Node]) -> None:
    graph.insert_before(anchor, nodes)


def replace_uses(old: ir.Value, new: ir.Value) -> None:
    """Point every consumer (and graph output slot) of ``old`` at ``new``."""
    ir.convenience.replace_all_uses_with(old, new)
    graph = old.graph
    if graph is not None and old.is_graph_output():
        for i, out in enumerate(graph.outputs):
            if out is old:
                new.name, old.name = old.name, f"{old.name}__replaced"
                graph.outputs[i] = new
