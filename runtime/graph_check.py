"""The manifest against the graph ONNX Runtime loaded: names, dtypes, fixed dims, and the model dims the
runtime sizes its buffers from (vocab, KV heads, head dim, KV dtype). A mismatch is refused when the engine
opens (``graphopt serve`` exits 2 naming the field) instead of failing inside every request.
"""

from __future__ import annotations

from typing import Any

from graphopt.core.errors import ArtifactError
from graphopt.core.manifest import Manifest, TensorSpec

ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
             "float64": "tensor(double)", "int64": "tensor(int64)", "int32": "tensor(int32)", "int8": "tensor(int8)",
             "uint8": "tensor(uint8)", "bool": "tensor(bool)", "float8_e4m3fn": "tensor(float8e4m3fn)"}
_KV_ROLES = ("past_key", "past_value", "present_key", "present_value")
_FIX = "rebuild the artifact with 'graphopt build'"


def check_session_io(manifest: Manifest, session: Any, graph: str = "model.onnx") -> None:
    """ArtifactError when ``session``'s inputs/outputs disagree with the manifest (names, dtypes, dims)."""
    expected = {spec.name for spec in manifest.inputs}
    actual = {node.name: node for node in session.get_inputs()}
    if expected != set(actual):
        raise ArtifactError(f"{graph} inputs {sorted(actual)} do not match manifest.json {sorted(expected)}; {_FIX}")
    outputs = {node.name: node for node in session.get_outputs()}
    for kind, specs, nodes in (("io.inputs", manifest.inputs, actual), ("io.outputs", manifest.outputs, outputs)):
        for spec in specs:
            node = nodes.get(spec.name)
            if node is None:
                raise ArtifactError(f"manifest.json {kind} lists {spec.name!r}, which {graph} does not have; {_FIX}")
            _check_tensor(spec, node, kind, graph)
            _check_role(manifest, spec, node, graph)


def _check_tensor(spec: TensorSpec, node: Any, kind: str, graph: str) -> None:
    wanted = ORT_TYPES.get(spec.dtype)
    if wanted is not None and node.type != wanted:
        raise ArtifactError(f"manifest.json {kind} {spec.name!r} has dtype {spec.dtype}, {graph} has {node.type}; "
                            f"{_FIX}")
    if len(spec.shape) != len(node.shape):
        raise ArtifactError(f"manifest.json {kind} {spec.name!r} has rank {len(spec.shape)}, {graph} has "
                            f"{len(node.shape)}; {_FIX}")
    for axis, (ours, theirs) in enumerate(zip(spec.shape, node.shape)):
        if isinstance(ours, int) and isinstance(theirs, int) and ours != theirs:
            raise ArtifactError(f"manifest.json {kind} {spec.name!r} has size {ours} on axis {axis}, {graph} has "
                                f"{theirs}; {_FIX}")


def _check_role(manifest: Manifest, spec: TensorSpec, node: Any, graph: str) -> None:
    """The model dims the runtime allocates from must be the graph's own."""
    dims = manifest.dims
    if spec.role in _KV_ROLES:
        for field, axis in (("num_kv_heads", 1), ("head_dim", 3)):
            _same_dim(f"model.{field}", getattr(dims, field), node, axis, graph)
        wanted = ORT_TYPES.get(manifest.kv_dtype)
        if wanted is not None and node.type != wanted:
            raise ArtifactError(f"manifest.json kv_cache.dtype is {manifest.kv_dtype}, {graph} {spec.name!r} is "
                                f"{node.type}; {_FIX}")
    if spec.role == "logits":
        _same_dim("model.vocab_size", dims.vocab_size, node, len(node.shape) - 1, graph)


def _same_dim(field: str, value: int, node: Any, axis: int, graph: str) -> None:
    shape = node.shape
    if axis >= len(shape):
        raise ArtifactError(f"{graph} {node.name!r} has rank {len(shape)}, too small for {field}; {_FIX}")
    if isinstance(shape[axis], int) and shape[axis] != value:
        raise ArtifactError(f"manifest.json {field} is {value}, but {graph} {node.name!r} has {shape[axis]} on "
                            f"axis {axis}; {_FIX}")
