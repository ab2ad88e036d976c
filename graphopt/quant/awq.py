"""Activation-aware weight quantization (AWQ-style) and SmoothQuant: pure functions on numpy arrays.

Both rescale the input channels of a linear layer, which is exact in fp32::

    y = x @ W = (x / s) @ (diag(s) W)        s [K] > 0, one per input channel

AWQ (Lin et al. 2023) picks s so that *int4 rounding* of diag(s)·W hurts the output least on real
activations: salient channels (large mean |x|) get s > 1, so their weights keep more precision.
It searches s = mean|x|^α over a grid of α on a sample of calibration rows, then searches a
per-(block, output-channel) clip ratio on the same rows. SmoothQuant (Xiao et al. 2023) picks
s = max|x|^α / max|w|^(1-α) in closed form, moving activation outliers into the weights so a
per-tensor int8 activation scale fits. The caller folds 1/s into the op that produces x.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from threadpoolctl import threadpool_limits

from graphopt.quant.numerics import quantize_int

AWQ_GRID = 20
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)


def search_threads():
    """One BLAS thread for the searches: thousands of mid-size matmuls, where thread hand-offs cost more
    than they save on a 2-core machine and stall badly when another process holds a core (measured:
    58 s vs 125 s wall for SmolLM2 with a busy neighbour)."""
    return threadpool_limits(limits=1, user_api="blas")


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """The chosen input-channel scale and what it bought (output MSE on the calibration rows)."""

    scale: np.ndarray  # [K]; 1 everywhere when scaling did not help
    alpha: float
    error_rtn: float
    error_best: float


def int4_output_error(x: np.ndarray, w: np.ndarray, w_quant: np.ndarray) -> float:
    """Mean squared error of x @ W against x @ W_quantized."""
    diff = x @ (w - w_quant)
    return float(np.mean(diff * diff))


def fake_int4(w: np.ndarray, block_size: int, clip: np.ndarray | None = None, full_range: bool = False) -> np.ndarray:
    """Round-to-nearest int4 (blocks along K) and back to float: the weight MatMulNBits computes with."""
    return quantize_int(w, 4, axis=0, block_size=block_size, clip=clip, full_range=full_range).dequantize()


def awq_scale_search(x: np.ndarray, w: np.ndarray, mean_abs_x: np.ndarray, block_size: int,
                     grid: int = AWQ_GRID, full_range: bool = False) -> ScaleSearch:
    """Search s = mean|x|^α (α in [0, 1)) minimising ||x W - (x/s) Q(diag(s) W)||² on rows ``x``.

    Args:
        x: calibration rows [R, K] of the layer input (fp32 graph).
        w: weight [K, N]; for inputs shared by several layers (q/k/v) pass them concatenated on N.
        mean_abs_x: mean |x| per input channel over all calibration tokens [K].
        full_range: round as ONNX Runtime does (:func:`graphopt.quant.numerics.quantize_int`).
    """
    baseline = int4_output_error(x, w, fake_int4(w, block_size, full_range=full_range))
    best = ScaleSearch(np.ones(w.shape[0], np.float32), 0.0, baseline, baseline)
    level = np.maximum(mean_abs_x.astype(np.float64), 1e-8)
    for step in range(1, grid):
        alpha = step / grid
        s = level ** alpha
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # centre the scales around 1
        w_back = fake_int4(w * s[:, None], block_size, full_range=full_range) / s[:, None]
        error = int4_output_error(x, w, w_back)
        if error < best.error_best:
            best = ScaleSearch(s, alpha, baseline, error)
    return best


def awq_clip_search(x: np.ndarray, w: np.ndarray, block_size: int, ratios=CLIP_GRID,
                    full_range: bool = False) -> np.ndarray:
    """Per (block, output channel) clip ratio minimising each block's share of the output error.

    For block g the partial output is x[:, g] @ W[g]; shrinking that block's range trades clipping
    error for rounding error. Its mean squared error over the rows is dᵀ C_g d with d = W[g] - Q(W[g])
    and C_g = x[:, g]ᵀ x[:, g] / R (a b×b Gram matrix, computed once). Returns ratios shaped like the
    int4 scale [K/b, N].
    """
    k, n = w.shape
    groups = k // block_size
    x_g = x.reshape(x.shape[0], groups, block_size)
    gram = np.einsum("rgb,rgc->gbc", x_g, x_g) / x.shape[0]  # [G, b, b]
    w_g = w.reshape(groups, block_size, n)  # [G, b, N]
    best_err = np.full((groups, n), np.inf)
    best_ratio = np.ones((groups, n), np.float32)
    for ratio in ratios:
        clip = np.full((groups, n), ratio, np.float32)
        d = w_g - fake_int4(w, block_size, clip, full_range).reshape(groups, block_size, n)
        err = np.sum(d * (gram @ d), axis=1)  # [G, N]
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, np.float32(ratio), best_ratio)
    return best_ratio


def smoothquant_scale(max_abs_x: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's s_j = max|x_j|^α / max|W_j,:|^(1-α), clamped away from 0 (w [K, N])."""
    x_max = np.maximum(max_abs_x.astype(np.float64), 1e-5)
    w_max = np.maximum(np.abs(w).max(axis=1).astype(np.float64), 1e-5)
    return np.clip(x_max ** alpha / w_max ** (1.0 - alpha), 1e-4, 1e4).astype(np.float32)

