"""The artifact I/O contract read back from a built graph, for the manifest."""

from __future__ import annotations

import re
from typing import Any

import onnx_ir as ir

from graphopt.core.errors import GraphoptError

_ROLES = {"input_ids", "position_ids", "cache_lens", "input_lens", "logit_positions", "logits"}
_LAYERED = re.compile(r"^(past_key|past_value|present_key|present_value)\.(\d+)$")


def io_specs(model: ir.Model) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) as manifest entries: name, dtype, symbolic shape, role, layer."""
    return [_spec(v) for v in model.graph.inputs], [_spec(v) for v in model.graph.outputs]


def _spec(value: ir.Value) -> dict[str, Any]:
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
    entry = {"name": value.name, "dtype": dtype, "shape": shape, "role": role}
    if layer is not None:
        entry["layer"] = layer
    return entry


def model_dims(model: ir.Model, config, generation_config) -> dict[str, Any]:
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
    return {
        "num_layers": len(pasts), "num_heads": int(heads), "num_kv_heads": int(kv_heads), "head_dim": int(head_dim),
        "hidden_size": int(hidden), "vocab_size": int(logits.shape[-1]),
        "max_seq": int(_first(config, "max_position_embeddings", "n_positions", "n_ctx")),
        "bos_token_id": bos, "eos_token_ids": eos_ids, "pad_token_id": pad,
    }


def _first(config, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise GraphoptError(f"model config has none of {names}; this architecture is not supported yet")
