"""A cheap sensitivity proxy for one quantized MatMul: its relative output error on calibration activations.

For a MatMul y = x W (x [R, K] a calibration sample of its input, W [K, N]) quantized at precision p::

    error_p = ‖x W − x̂ Ŵ_p‖² / ‖x W‖²       (Frobenius norms over the R sampled rows)

Ŵ_p is W rounded to nearest (RTN) on p's grid — int4 / int8 blocks of b along K, int8 per output
channel, fp8 e4m3 per output channel — and x̂ is x through the activation quantizer the recipe adds (fp8:
static per tensor from the calibrated amax; int8: symmetric per tensor from the sample's own amax, as a
dynamic quantizer would). int4 blocks, and the int8 blocks they are promoted to, add no activation quantizer
to the graph, but the kernel may round the input itself: ONNX Runtime's MatMulNBits at accuracy_level ≥ 2
(ort-cpu-int4's 4) rounds each row to int8 in blocks of the weight's block size, symmetric, before its integer
dot products. ``Grid.activation_block`` says so, and x̂ is then that rounding (else x̂ = x). A float MatMul
has error 0.

Why the kernel's rounding is modelled: the proxy used to score the int4 ladder's int8 step with a per-tensor int8
input, which a layer with outlier inputs fails, so its int4 → int8 step looked no better than int4. On SmolLM2
``model.layers.3.mlp.down_proj``'s step ranked 404th of 422 and ``--int4 --kl-budget 0.05`` met the budget only
with that layer's float step (268th: KL 0.163 → 0.0044 between 264 and 290 promotions, 250.8 MiB). Modelled as
the kernel computes, the step ranks 162nd and the budget is met at 165 promotions, all int8: KL 0.0277, 133.1 MiB.

What the proxy leaves out, honestly: AWQ's scale and clip search (int4 MatMuls are rounded better than
RTN), and how a MatMul's error grows through the layers above it to the logits. It only *ranks* candidates;
``graphopt build --kl-budget`` decides with the real evaluation KL.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from graphopt.quant.numerics import fake_quant_tensor, quantize_fp8, quantize_int, tensor_scale

LADDERS = {"int4": ("int4", "int8", "float"), "int8": ("int8", "float"), "fp8": ("fp8", "float")}


@dataclasses.dataclass(frozen=True)
class Grid:
    """How a recipe quantizes: the base precision, the int4/int8 block (0 = per channel), fp8 activations,
    and whether int4 rounds on ONNX Runtime's 16-level grid (quantize-int4's ``full_range``)."""
    base: str
    block_size: int = 32
    activations: bool = True
    full_range: bool = False
    activation_block: int = 0  # int4 ladder: the kernel rounds its input to int8 in blocks of this size (0: never)


def quantized_weight(w: np.ndarray, precision: str, grid: Grid) -> np.ndarray:
    """W [K, N] rounded on ``precision``'s grid (RTN) and dequantized."""
    if precision == "float":
        return w
    if precision == "fp8":
        return quantize_fp8(w, axis=1).dequantize()
    bits = 4 if precision == "int4" else 8
    if grid.block_size and w.shape[0] % grid.block_size == 0:  # int4, and int8 promoted from int4: blocks
        full_range = grid.full_range and bits == 4
        return quantize_int(w, bits, axis=0, block_size=grid.block_size, full_range=full_range).dequantize()
    return quantize_int(w, bits, axis=1).dequantize()


def quantized_input(x: np.ndarray, precision: str, grid: Grid, amax: float | None) -> np.ndarray:
    """The input as the recipe's activation quantizer, or the int4 ladder's kernel, leaves it (float: unchanged)."""
    if grid.base == "int4":
        return block_int8(x, grid.activation_block) if grid.activation_block and precision != "float" else x
    if precision not in ("fp8", "int8") or not grid.activations:
        return x
    scale = tensor_scale(amax if precision == "fp8" and amax else float(np.abs(x).max()), precision)
    return fake_quant_tensor(x, float(scale), precision)


def block_int8(x: np.ndarray, block: int) -> np.ndarray:
    """x [R, K] rounded to symmetric int8 per row in blocks of ``block`` along K (amax / 127 each; a last,
    shorter block on its own), as MatMulNBits' int8-activation kernel does, and dequantized."""
    rows, k = x.shape
    padded = np.zeros((rows, -(-k // block) * block), np.float32)
    padded[:, :k] = x
    blocks = padded.reshape(rows, -1, block)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return (np.clip(np.rint(blocks / scale), -127, 127) * scale).reshape(rows, -1)[:, :k]


def output_error(x: np.ndarray | None, w: np.ndarray, precision: str, grid: Grid,
                 amax: float | None = None) -> float:
    """error_p above; without a calibration sample (``x`` None) the weight's own relative error."""
    if precision == "float":
        return 0.0
    w_hat = quantized_weight(w, precision, grid)
    if x is None:
        return float(np.sum((w - w_hat) ** 2) / max(float(np.sum(w * w)), 1e-30))
    x = x.astype(np.float32)
    reference = x @ w
    got = quantized_input(x, precision, grid, amax) @ w_hat
    return float(np.sum((reference - got) ** 2) / max(float(np.sum(reference * reference)), 1e-30))


def ladder_errors(x: np.ndarray | None, w: np.ndarray, grid: Grid, start: str, amax: float | None = None
                  ) -> dict[str, float]:
    """error_p for every precision on the ladder from ``start`` up (``start`` = the base, or a pinned step)."""
    ladder = LADDERS[grid.base]
    return {p: output_error(x, w, p, grid, amax) for p in ladder[ladder.index(start):]}
