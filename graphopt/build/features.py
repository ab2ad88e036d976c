"""The architecture features a build found, for the build report and ``graphopt inspect``.

Read from what the passes saw, not from the config: fuse-attention's counters (sliding windows,
logit softcapping, sinks, QK-norm: layers of each), the head layout of the fused attention, and the
trace's mixture-of-experts form (TopK routers in the traced graph).
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

MOE_KEY = "graphopt.moe"  # model metadata written by the trace: how MoE blocks were traced


def features_of(model: ir.Model, records: list, traced_ops: dict[str, int], dims: dict[str, Any]) -> dict[str, Any]:
    """{'attention': 'GQA 4/2', 'sliding_window': {'layers': 1, 'window': 8}, 'softcap': …, 'moe': …}."""
    stats = next((r.stats for r in records if r.name == "fuse-attention"), {})
    layers = dims["num_layers"]
    heads, kv_heads = dims["num_heads"], dims["num_kv_heads"]
    kind = "MHA" if heads == kv_heads else ("MQA" if kv_heads == 1 else "GQA")
    found: dict[str, Any] = {"attention": f"{kind} {heads}/{kv_heads} heads, head dim {dims['head_dim']}"}
    if stats.get("sliding_window"):
        found["sliding_window"] = {"layers": stats["sliding_window"], "of": layers, "window": stats.get("window")}
    if stats.get("softcap"):
        found["attention_softcap"] = {"layers": stats["softcap"], "cap": stats.get("softcap_value")}
    for name in ("sinks", "qk_norm"):
        if stats.get(name):
            found[name] = {"layers": stats[name]}
    routers = traced_ops.get("TopK", 0)
    if model.metadata_props.get(MOE_KEY) and routers:
        found["moe"] = {"layers": routers, "lowering": model.metadata_props[MOE_KEY]}
    return found


def describe(features: dict[str, Any]) -> str:
    """One line for humans: 'GQA 4/2 heads, head dim 32; sliding window 8 (1 of 2 layers); QK-norm; MoE …'."""
    parts = [features.get("attention", "")]
    if "sliding_window" in features:
        w = features["sliding_window"]
        parts.append(f"sliding window {w['window']} ({w['layers']} of {w['of']} layers)")
    if "attention_softcap" in features:
        parts.append(f"attention softcap {features['attention_softcap']['cap']}")
    if "sinks" in features:
        parts.append("attention sinks")
    if "qk_norm" in features:
        parts.append("QK-norm")
    if "moe" in features:
        parts.append(f"MoE in {features['moe']['layers']} layers ({features['moe']['lowering']})")
    return "; ".join(p for p in parts if p)
