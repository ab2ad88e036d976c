"""Tiny GPTQ and AWQ checkpoints for the hf_quant tests: tests/tiny_models.py's tiny Llama (2 layers, hidden 64,
intermediate 128) with every decoder Linear quantized round-to-nearest by a test-side packer that follows the
documented layouts (AutoGPTQ's QuantLinear.pack, AutoAWQ's WQLinear_GEMM.from_linear), written independently of
graphopt's reader. ``reference`` holds each Linear's fp32 [N, K] weight straight from the unpacked integers:
W[k, n] = scale[g(k), n] · (q[k, n] − zero[g(k), n]), in float64, as fp32.

Act-order draws one input order per input (q/k/v share one, gate/up another), as GPTQ's shared Hessian gives.
GPTQ v1 stores zero−1 in 4 bits, so a zero of 0 would wrap to 16 on reading (v1's own flaw): zeros here stay ≥ 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tiny_models import make_tiny_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def write_checkpoint(folder: Path, method: str = "gptq", bits: int = 4, group: int = 32, sym: bool = False,
                     act_order: bool = False, fmt: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Save the quantized tiny Llama into ``folder``; returns prefix → reference fp32 [N, K] weight.
    ``fmt``: the GPTQ checkpoint_format (default "gptq", v1) or the AWQ version (default "gemm")."""
    fmt = fmt or ("gptq" if method == "gptq" else "gemm")
    make_tiny_model("llama", folder, seed=seed)
    state = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(seed)
    reference, orders = {}, {}
    for name in sorted(state):
        prefix = name.removesuffix(".weight")
        if not name.endswith(".weight") or prefix.split(".")[-1] not in LINEARS:
            continue
        weight = state.pop(name).numpy().T.astype(np.float64)  # [K, N]
        k = weight.shape[0]
        size = k if group == -1 else group
        shared = prefix.rsplit(".", 1)[0] + {"k_proj": ".q_proj", "v_proj": ".q_proj", "up_proj": ".gate_proj"}.get(
            prefix.split(".")[-1], "." + prefix.split(".")[-1])  # one input, one Hessian: one act-order
        order = orders.setdefault(shared, rng.permutation(k)) if act_order else np.arange(k)
        g_idx = np.empty(k, np.int32)
        g_idx[order] = np.arange(k) // size
        q, zero, scale = _quantize(weight, g_idx, bits, sym, low=1 if (method == "gptq" and fmt == "gptq") else 0)
        reference[prefix] = (scale.astype(np.float64)[g_idx] * (q - zero[g_idx])).astype(np.float32).T
        if method == "gptq":
            stored = zero - 1 if fmt == "gptq" else zero
            state |= {f"{prefix}.qweight": _pack_rows(q, bits), f"{prefix}.qzeros": _pack_cols(stored, bits),
                      f"{prefix}.scales": torch.from_numpy(scale), f"{prefix}.g_idx": torch.from_numpy(g_idx)}
        else:
            state |= {f"{prefix}.qweight": _pack_awq(q), f"{prefix}.qzeros": _pack_awq(zero),
                      f"{prefix}.scales": torch.from_numpy(scale)}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if method == "gptq":
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
                                         "desc_act": act_order, "checkpoint_format": fmt}
    else:
        config["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group,
                                         "zero_point": True, "version": fmt}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return reference


def _quantize(weight: np.ndarray, g_idx: np.ndarray, bits: int, sym: bool, low: int):
    """Round-to-nearest per group: q [K, N], zero [G, N] (ints), scale [G, N] fp16."""
    top, groups = (1 << bits) - 1, int(g_idx.max()) + 1
    zero = np.empty((groups, weight.shape[1]), np.int64)
    scale = np.empty((groups, weight.shape[1]), np.float16)
    q = np.empty(weight.shape, np.int64)
    for g in range(groups):
        rows = weight[g_idx == g]
        if sym:
            s = (np.abs(rows).max(axis=0) / (top // 2)).astype(np.float16)
            z = np.full(rows.shape[1], 1 << (bits - 1))
        else:
            lo, hi = np.minimum(rows.min(axis=0), 0), np.maximum(rows.max(axis=0), 0)
            s = ((hi - lo) / top).astype(np.float16)
            z = np.clip(np.round(-lo / s.astype(np.float64)), low, top).astype(np.int64)
        scale[g], zero[g] = s, z
        q[g_idx == g] = np.clip(np.round(rows / s.astype(np.float64)) + z, 0, top)
    return q, zero, scale


def _pack_rows(values: np.ndarray, bits: int) -> torch.Tensor:
    """GPTQ qweight: [K, N] → int32 [K·bits/32, N], input k·(32/bits)+j at bits j·bits of word k."""
    per = 32 // bits
    parts = values.astype(np.uint32).reshape(-1, per, values.shape[1])
    packed = np.zeros((parts.shape[0], values.shape[1]), np.uint32)
    for j in range(per):
        packed |= (parts[:, j, :] & ((1 << bits) - 1)) << np.uint32(bits * j)
    return torch.from_numpy(packed.view(np.int32))


def _pack_cols(values: np.ndarray, bits: int) -> torch.Tensor:
    """GPTQ qzeros: [G, N] → int32 [G, N·bits/32], column c·(32/bits)+j at bits j·bits of word c."""
    per = 32 // bits
    parts = values.astype(np.uint32).reshape(values.shape[0], -1, per)
    packed = np.zeros(parts.shape[:2], np.uint32)
    for j in range(per):
        packed |= (parts[:, :, j] & ((1 << bits) - 1)) << np.uint32(bits * j)
    return torch.from_numpy(packed.view(np.int32))


def _pack_awq(values: np.ndarray) -> torch.Tensor:
    """AWQ gemm: [R, N] → int32 [R, N/8], nibble i of word c holding column 8c + AWQ_ORDER[i]."""
    parts = values.astype(np.uint32).reshape(values.shape[0], -1, 8)
    packed = np.zeros(parts.shape[:2], np.uint32)
    for i, column in enumerate(AWQ_ORDER):
        packed |= (parts[:, :, column] & 0xF) << np.uint32(4 * i)
    return torch.from_numpy(packed.view(np.int32))
