"""GGUF block formats → integer blocks with a scale and an optional per-block offset, reproducing the file's
dequantized values exactly (llama.cpp's ggml-quants layouts; gguf-py's ``gguf.quants`` is the reference).

    one GGUF row (K values along a MatMul's input dimension), blocks of b values:
        value[k] = scale[k // b] · q[k] + offset[k // b]            offset only for Q4_1, Q5_1, Q4_K, Q5_K

    type   b    q stored          scale                 offset (before the shift below)
    Q4_0   32   int4  q-8         d                     –
    Q8_0   32   int8  q           d                     –
    Q5_0   32   int8  q-16        d                     –
    Q6_K   16   int8  q-32        d · sc (int8)         –
    Q4_1   32   int4  q-8         d                     m
    Q4_K   32   int4  q-8         d · sc (6-bit)        -dmin · mn (6-bit)
    Q5_1   32   int8  q (0..31)   d                     m
    Q5_K   32   int8  q (0..31)   d · sc                -dmin · mn

A block that keeps a minimum is stored with zero-point 0 (TensorRT's form) plus an offset the graph adds as
``blocksum(x) @ offset``: for int4, q ∈ [0, 15] is shifted to q-8 ∈ [-8, 7] and the offset becomes
``m + 8·d``, which must be exact in fp32 (checked; it is for every block of SmolLM2's Q4_1 file); where it
is not, the tensor keeps q unshifted in int8 instead (exact, twice the bytes). Every product here is exact in
fp32 (fp16 · 6- or 8-bit integer), so ``fp32(scale · q + offset)`` equals gguf-py's dequantized value bit for
bit (:func:`BlockQuant.dequantize`; the tests hold it to that).
"""

from __future__ import annotations

import dataclasses

import numpy as np

SUPER = 256  # K-quant super-block
# type → (values per GGUF block, bytes per GGUF block)
LAYOUTS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
           "Q4_K": (SUPER, 144), "Q5_K": (SUPER, 176), "Q6_K": (SUPER, 210)}
EXACT_TYPES = tuple(LAYOUTS)
# type → (bits stored, block, has an offset): the size of the kept form (int8 where q is 5 or 6 bits wide)
STORED = {"Q4_0": (4, 32, False), "Q4_1": (4, 32, True), "Q5_0": (8, 32, False), "Q5_1": (8, 32, True),
          "Q8_0": (8, 32, False), "Q4_K": (4, 32, True), "Q5_K": (8, 32, True), "Q6_K": (8, 16, False)}


class NoExactForm(ValueError):
    """A GGUF type this module cannot represent exactly (the caller names the tensor)."""


@dataclasses.dataclass(frozen=True)
class BlockQuant:
    """One GGUF tensor as rows of integer blocks: ``q`` int8 [rows, K] (int4 values when ``bits`` is 4),
    ``scale`` fp32 [rows, K/block], ``offset`` fp32 [rows, K/block] or None; value = scale·q + offset.
    ``input_order`` (GPTQ act-order, graphopt.quant.hf_packing): the blocks run along the input channels taken
    in this order — column i of ``q`` is input channel input_order[i]; None: in their own order."""

    q: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None
    bits: int
    block: int
    gguf_type: str
    input_order: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """The represented values in fp32 (computed in float64, where every step here is exact)."""
        value = np.repeat(self.scale.astype(np.float64), self.block, axis=1) * self.q
        if self.offset is not None:
            value += np.repeat(self.offset.astype(np.float64), self.block, axis=1)
        return value.astype(np.float32)

    def permute_rows(self, order: np.ndarray) -> BlockQuant:
        """The same blocks with rows reordered (llama's rotary q/k rows): exact, blocks run along K."""
        offset = None if self.offset is None else self.offset[order]
        return dataclasses.replace(self, q=self.q[order], scale=self.scale[order], offset=offset)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored form: packed q, fp32 scales and offsets."""
        extra = 0 if self.offset is None else self.offset.size * 4
        return self.q.size * self.bits // 8 + self.scale.size * 4 + extra


def decode(gguf_type: str, raw: np.ndarray, cols: int) -> BlockQuant:
    """``raw`` uint8 [rows, bytes per row] of a ``gguf_type`` tensor with ``cols`` values per row."""
    if gguf_type not in LAYOUTS:
        raise NoExactForm(f"GGUF type {gguf_type} has no exact int4/int8 block form here "
                          f"(supported: {', '.join(EXACT_TYPES)})")
    per_block, nbytes = LAYOUTS[gguf_type]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows * (cols // per_block), nbytes)
    q, scale, offset, block = _DECODERS[gguf_type](blocks)
    q, scale = q.reshape(rows, cols), scale.reshape(rows, cols // block)
    offset = None if offset is None else offset.reshape(rows, cols // block)
    return _signed(q, scale, offset, block, gguf_type)


def _signed(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, block: int, gguf_type: str) -> BlockQuant:
    """Store q with zero-point 0: int4 when its range fits (shifting unsigned 4-bit q by 8 into the offset
    when that is exact in fp32), else int8."""
    lo, hi = int(q.min(initial=0)), int(q.max(initial=0))
    if lo >= -8 and hi <= 7:
        return BlockQuant(q.astype(np.int8), scale, offset, 4, block, gguf_type)
    if offset is not None and lo >= 0 and hi <= 15:
        shifted = offset + np.float32(8) * scale  # fp32, as the graph will hold it
        exact = shifted.astype(np.float64) == offset.astype(np.float64) + 8.0 * scale.astype(np.float64)
        if exact.all():
            return BlockQuant((q - 8).astype(np.int8), scale, shifted, 4, block, gguf_type)
    return BlockQuant(q.astype(np.int8), scale, offset, 8, block, gguf_type)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)  # [n, 1]


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """Bytes [n, m] → 4-bit values: per ``group`` bytes, the low nibbles, then the high ones."""
    n = qs.shape[0]
    split = qs.reshape(n, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (split & np.uint8(0x0F)).reshape(n, -1).astype(np.int16)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: a little-endian uint32 whose bit i is value i's fifth bit → [n, 32] of 0/16."""
    bits = qh.copy().view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    return ((bits & 1) << 4).astype(np.int16)


def _q4_0(b):
    return _nibbles(b[:, 2:], 16) - 8, _f16(b, 0), None, 32


def _q4_1(b):
    return _nibbles(b[:, 4:], 16), _f16(b, 0), _f16(b, 2), 32


def _q5_0(b):
    return (_nibbles(b[:, 6:], 16) | _high_bits32(b[:, 2:6])) - 16, _f16(b, 0), None, 32


def _q5_1(b):
    return _nibbles(b[:, 8:], 16) | _high_bits32(b[:, 4:8]), _f16(b, 0), _f16(b, 2), 32


def _q8_0(b):
    return b[:, 2:].copy().view(np.int8).astype(np.int16), _f16(b, 0), None, 32


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes → eight 6-bit scales and eight 6-bit mins per super-block."""
    d, m, m_d = np.split(packed.reshape(-1, 3, 4), 3, axis=1)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(-1, 8).astype(np.float32), mn.reshape(-1, 8).astype(np.float32)


def _q4_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    return _nibbles(b[:, 16:], 32), _f16(b, 0) * sc, -(_f16(b, 2) * mn), 32


def _q5_k(b):
    sc, mn = _k_scales(b[:, 4:16])
    qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = ((qh & 1) << 4).reshape(b.shape[0], -1).astype(np.int16)
    return _nibbles(b[:, 48:], 32) | high, _f16(b, 0) * sc, -(_f16(b, 2) * mn), 32


def _q6_k(b):
    n = b.shape[0]
    low = _nibbles(b[:, :128], 64).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    high = ((qh & 3).reshape(n, 8, 32).astype(np.int16)) << 4
    scales = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    return (low | high).reshape(n, -1) - 32, _f16(b, 208) * scales, None, 16


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
             "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
