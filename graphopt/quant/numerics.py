"""Quantization math: short pure numpy functions that return quantized values with their scales.

Conventions are ONNX ``QuantizeLinear``/``DequantizeLinear`` with zero-point 0 (symmetric), the form
TensorRT expects for explicit quantization::

    W [K, N]   a MatMul weight (y = x @ W): K input channels, N output channels
    per-channel  axis=1, scale [N]            W ≈ q · scale[None, :]
    blocked      axis=0, block b, scale [K/b, N]   W[k, n] ≈ q[k, n] · scale[k // b, n]

    int8: q ∈ [-127, 127]   (scale = amax / 127)
    int4: q ∈ [-8, 7]       (scale = amax / 7; -8 is reachable only after clipping)
    fp8 e4m3fn: q on the e4m3 grid, |q| ≤ 448 (scale = amax / 448)

The functions work for any ``axis`` so the tied embedding E [V, H] quantizes with blocks along H
(axis 1), which is the lm_head's input-channel axis (logits = h @ E.T).
"""

from __future__ import annotations

import dataclasses

import numpy as np

INT_MAX = {4: 7, 8: 127}
INT_MIN = {4: -8, 8: -128}
E4M3_MAX = 448.0
E4M3_MIN_EXP = -6  # smallest normal exponent; below it the grid is uniform (subnormals)
E4M3_MANTISSA_BITS = 3
TINY = np.float32(1e-12)  # the scale of an all-zero channel/block (any positive value dequantizes to 0)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """``q`` (int8 container for int4/int8; float32 values on the fp8 grid) and the DequantizeLinear
    parameters that reproduce the weight: ``scale``, ``axis`` and ``block_size`` (0 = per-channel)."""

    q: np.ndarray
    scale: np.ndarray
    axis: int
    block_size: int
    kind: str  # "int4", "int8" or "fp8"

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * expand_scale(self.scale, self.q.shape, self.axis, self.block_size)


def expand_scale(scale: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """Broadcast a per-channel ([C]) or blocked (rank-n, ``axis`` dim divided by b) scale to ``shape``."""
    axis = axis % len(shape)
    if block_size == 0:
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return scale.reshape(view)
    return np.repeat(scale, block_size, axis=axis)


def check_block(dim: int, block_size: int) -> None:
    """Blocks must tile the axis exactly (ONNX blocked DQ and MatMulNBits without padding)."""
    if block_size <= 0 or dim % block_size:
        raise ValueError(f"block size {block_size} does not divide dimension {dim}")


def block_amax(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """max |w| over each block of ``block_size`` along ``axis`` (shape: that axis divided by b)."""
    axis = axis % w.ndim
    check_block(w.shape[axis], block_size)
    split = w.shape[:axis] + (w.shape[axis] // block_size, block_size) + w.shape[axis + 1:]
    return np.abs(w.reshape(split)).max(axis=axis + 1)


def channel_amax(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| per index of ``axis`` (a 1-D array of length w.shape[axis])."""
    axis = axis % w.ndim
    return np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))


def _scale(amax: np.ndarray, qmax: float) -> np.ndarray:
    return np.maximum(amax / qmax, TINY).astype(np.float32)


def block_peak(w: np.ndarray, axis: int, block_size: int) -> np.ndarray:
    """The signed value of largest |w| in each block of ``block_size`` along ``axis`` (shaped like block_amax)."""
    axis = axis % w.ndim
    check_block(w.shape[axis], block_size)
    moved = np.moveaxis(w, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // block_size, block_size)
    peak = np.take_along_axis(groups, np.abs(groups).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return np.moveaxis(peak, -1, axis)


def quantize_int(w: np.ndarray, bits: int, axis: int, block_size: int = 0,
                 clip: np.ndarray | None = None, full_range: bool = False) -> Quantized:
    """Symmetric round-to-nearest (RTN) int4/int8, per-channel (block_size 0) or blocked along ``axis``.

    ``clip`` (same shape as the scale, in (0, 1]) shrinks each range before rounding (AWQ's clip search).
    ``full_range`` (blocked only) is ONNX Runtime's symmetric form (MatMulNBitsQuantizer, GenAI's builder):
    each block's largest-magnitude value maps to INT_MIN exactly (scale = that value / -8 for int4, negative
    when the value is positive), so all 2^bits levels are used — a step 7/8 of amax/7 for int4.
    """
    if full_range:
        if block_size == 0:
            raise ValueError("full_range needs blocks (block_size > 0)")
        peak = block_peak(w, axis, block_size) * (1.0 if clip is None else clip)
        scale = (peak / INT_MIN[bits]).astype(np.float32)
        scale = np.where(np.abs(scale) < TINY, TINY, scale).astype(np.float32)
        full = expand_scale(scale, w.shape, axis, block_size)
        q = np.clip(np.rint(w / full), INT_MIN[bits], INT_MAX[bits]).astype(np.int8)
        return Quantized(q, scale, axis, block_size, f"int{bits}")
    amax = channel_amax(w, axis) if block_size == 0 else block_amax(w, axis, block_size)
    if clip is not None:
        amax = amax * clip
    scale = _scale(amax, INT_MAX[bits])
    full = expand_scale(scale, w.shape, axis, block_size)
    q = np.clip(np.rint(w / full), INT_MIN[bits], INT_MAX[bits]).astype(np.int8)
    return Quantized(q, scale, axis, block_size, f"int{bits}")


def round_e4m3(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest float8 e4m3fn value (ties to even), saturating at ±448.

    e4m3fn has 3 mantissa bits, so inside binade [2^e, 2^(e+1)) the grid step is 2^(e-3); below the
    smallest normal 2^-6 the step stays 2^-9 (subnormals). NaN stays NaN; there is no infinity.
    """
    x = np.asarray(x, dtype=np.float32)
    _, exp = np.frexp(x)  # x = m · 2^exp with |m| in [0.5, 1): the binade is 2^(exp-1)
    step = np.ldexp(np.float32(1.0), np.maximum(exp - 1, E4M3_MIN_EXP) - E4M3_MANTISSA_BITS)
    rounded = np.rint(x / step) * step  # np.rint rounds halves to even
    return np.clip(rounded, -E4M3_MAX, E4M3_MAX).astype(np.float32)


def quantize_fp8(w: np.ndarray, axis: int) -> Quantized:
    """fp8 e4m3fn per channel of ``axis``: scale = amax / 448, q = e4m3(w / scale)."""
    scale = _scale(channel_amax(w, axis), E4M3_MAX)
    q = round_e4m3(w / expand_scale(scale, w.shape, axis, 0))
    return Quantized(q, scale, axis, 0, "fp8")


def tensor_scale(amax: float, kind: str) -> np.float32:
    """Per-tensor activation scale from a calibrated amax (int8: symmetric 127, fp8: 448)."""
    qmax = E4M3_MAX if kind == "fp8" else INT_MAX[8]
    return np.float32(max(float(amax), float(TINY)) / qmax)


def fake_quant_tensor(x: np.ndarray, scale: float, kind: str) -> np.ndarray:
    """QuantizeLinear→DequantizeLinear of a tensor with one scale (int8 saturates at ±127/-128)."""
    if kind == "fp8":
        return round_e4m3(x / scale) * np.float32(scale)
    return np.clip(np.rint(x / scale), INT_MIN[8], INT_MAX[8]).astype(np.float32) * np.float32(scale)


def pack_uint4(q: np.ndarray) -> np.ndarray:
    """Signed int4 values [..., 2m] → bytes [..., m] of unsigned nibbles (q + 8), low nibble first.

    This is MatMulNBits's / GatherBlockQuantized's layout: their default zero point for 4 bits is 8,
    so symmetric int4 needs no zero-point tensor.
    """
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_uint4` (back to signed int8 values in [-8, 7])."""
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """||reference - approx|| / ||reference|| (Frobenius)."""
    denom = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - approx)) / denom if denom else 0.0
