"""graphopt.quant.gguf_blocks: every supported GGUF block type decodes to int4/int8 blocks whose
scale·q + offset equals gguf-py's dequantized values bit for bit, on random blocks (random scales and
minima — not only the values a quantizer writes) and on blocks quantized from random weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from graphopt.quant.gguf_blocks import EXACT_TYPES, LAYOUTS, NoExactForm, decode

ROWS = 6


def _random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes with every fp16 field (d, m, dmin) a finite value of moderate size."""
    per_block, nbytes = LAYOUTS[kind]
    raw = rng.integers(0, 256, size=(rows * cols // per_block, nbytes), dtype=np.uint8)
    fields = {"Q6_K": [208]}.get(kind, [0, 2] if kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0])
    for start in fields:
        halves = rng.normal(0, 0.05, size=raw.shape[0]).astype(np.float16)
        raw[:, start:start + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", EXACT_TYPES)
def test_random_blocks_are_exact(kind):
    rng = np.random.default_rng(0)
    cols = 512
    raw = _random_blocks(kind, ROWS, cols, rng)
    blocks = decode(kind, raw, cols)
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(ROWS, cols)
    assert np.array_equal(blocks.dequantize().view(np.uint32), reference.view(np.uint32))
    assert blocks.q.dtype == np.int8 and blocks.q.shape == (ROWS, cols)
    assert blocks.q.min() >= (-8 if blocks.bits == 4 else -128) and blocks.q.max() <= (7 if blocks.bits == 4 else 127)
    assert blocks.scale.shape == (ROWS, cols // blocks.block)
    assert (blocks.offset is not None) == (kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))


@pytest.mark.parametrize("kind,bits", [("Q4_0", 4), ("Q4_1", 4), ("Q5_0", 8), ("Q5_1", 8), ("Q8_0", 8)])
def test_quantized_weights_are_exact(kind, bits):
    """What llama.cpp's quantizer writes (Q4_1 with 'm + 8·d' exact in fp32: stored as int4)."""
    weights = np.random.default_rng(1).normal(0, 0.02, size=(ROWS, 128)).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(weights, qtype)
    blocks = decode(kind, raw, 128)
    assert blocks.bits == bits
    assert np.array_equal(blocks.dequantize(), gguf.quants.dequantize(raw, qtype))


def test_inexact_shift_falls_back_to_int8():
    """Q4_1 whose m + 8·d does not fit fp32 keeps q unshifted in int8 (exact, twice the bytes)."""
    raw = gguf.quants.quantize(np.linspace(0, 1, 64, dtype=np.float32).reshape(2, 32), gguf.GGMLQuantizationType.Q4_1)
    raw[:, 0:2] = np.array([[1.0]], np.float16).view(np.uint8)  # d = 1
    raw[:, 2:4] = np.array([[2.0 ** -24]], np.float16).view(np.uint8)  # m = 2^-24: 8 + 2^-24 is not an fp32
    blocks = decode("Q4_1", raw, 32)
    assert blocks.bits == 8 and blocks.q.min() >= 0
    assert np.array_equal(blocks.dequantize(), gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1))


def test_rows_permute_exactly():
    raw = _random_blocks("Q4_1", ROWS, 64, np.random.default_rng(2))
    order = np.array([3, 0, 5, 1, 4, 2])
    blocks = decode("Q4_1", raw, 64)
    assert np.array_equal(blocks.permute_rows(order).dequantize(), blocks.dequantize()[order])


def test_type_without_exact_form():
    with pytest.raises(NoExactForm, match="IQ4_NL"):
        decode("IQ4_NL", np.zeros((1, 18), np.uint8), 32)
