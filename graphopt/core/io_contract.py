"""The artifact I/O contract: its tensor names and roles, defined here once, and read back from a graph.

    inputs   input_ids, position_ids [B, S]; cache_lens, input_lens [B]; logit_positions [B, k];
             past_key.{i}, past_value.{i} [B, Hkv, max_seq, D] per layer i
    outputs  logits [B, k, V]; present_key.{i}, present_value.{i} (written in place into the pasts)

insert-kv-cache and keep-logits create these names (:func:`cache_name`), the manifest records them with their
roles (:func:`io_specs`), and the engines bind by role (:data:`INPUT_ROLES`, :func:`cache_pairs`).
"""

from __future__ import annotations

import re
import onnx_ir as ir

from graphopt.core.errors import GraphoptError
from graphopt.core.manifest import Manifest, ModelDims, TensorSpec

INPUT_ROLES = ("input_ids", "position_ids", "cache_lens", "input_lens", "logit_positions")  # in the call order
OUTPUT_ROLES = ("logits",)
CACHE_KINDS = ("key", "value")
_ROLES = set(INPUT_ROLES) | set(OUTPUT_ROLES)
_LAYERED = re.compile(r"^(past_key|past_value|present_key|present_value)\.(\d+)$")


def cache_name(direction: str, kind: str, layer: int) -> str:
    """``past_key.3``: the name of layer ``layer``'s ``kind`` cache input (``past``) or output (``present``)."""
    return f"{direction}_{kind}.{layer}"


def cache_pairs(manifest: Manifest) -> list[tuple[str, str]]:
    """(past input, present output) names, K then V per layer, from the manifest's roles."""
    return [(manifest.input(f"past_{kind}", layer).name, manifest.output(f"present_{kind}", layer).name)
            for layer in range(manifest.dims.num_layers) for kind in CACHE_KINDS]


def io_specs(model: ir.Model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a graph as contract tensors: name, dtype, symbolic shape, role, layer."""
    return [_spec(v) for v in model.graph.inputs], [_spec(v) for v in model.graph.outputs]


def _spec(value: ir.Value) -> TensorSpec:
    layered = _LAYERED.match(value.name or "")
    if layered:
        role, layer = layered.group(1), int(layered.group(2))
    elif value.name in _ROLES:
        role, layer = value.name, None
    else:
        raise GraphoptError(f"graph I/O {value.name!r} is not part of the artifact contract; "
                            "the recipe must end with insert-kv-cache and keep-logits applied")
    dtype = value.dtype.numpy().name if value.dtype is not None else "float32"
    shape = [d if isinstance(d, int) else str(d) for d in (value.shape or [])]
    return TensorSpec(value.name, dtype, tuple(shape), role, layer)


def model_dims(model: ir.Model, config, generation_config) -> ModelDims:
    pasts = [v for v in model.graph.inputs if v.name.startswith("past_key.")]
    if not pasts:
        raise GraphoptError("the graph has no past_key inputs; add insert-kv-cache to the recipe")
    _, kv_heads, _, head_dim = pasts[0].shape
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else config.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else getattr(config, "pad_token_id", None)
    bos = generation_config.bos_token_id if generation_config.bos_token_id is not None else getattr(config, "bos_token_id", None)
    return ModelDims(num_layers=len(pasts), num_heads=int(heads), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
                     hidden_size=int(hidden), vocab_size=int(logits.shape[-1]),
                     max_seq=int(_first(config, "max_position_embeddings", "n_positions", "n_ctx")),
                     bos_token_id=bos, eos_token_ids=tuple(eos_ids), pad_token_id=pad)


def _first(config, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise GraphoptError(f"model config has none of {names}; this architecture is not supported yet")
