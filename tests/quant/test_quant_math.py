"""Quantization math against numpy references and ml_dtypes; AWQ against plain rounding."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from graphopt.quant.awq import awq_clip_search, awq_scale_search, fake_int4, int4_output_error, smoothquant_scale
from graphopt.quant.numerics import (fake_quant_tensor, pack_uint4, quantize_fp8, quantize_int, relative_error,
                                 round_e4m3, unpack_uint4)

RNG = np.random.default_rng(0)


def test_int8_per_channel_matches_reference() -> None:
    w = RNG.standard_normal((64, 24)).astype(np.float32)
    qz = quantize_int(w, 8, axis=1)
    scale = np.abs(w).max(axis=0) / 127  # reference: one scale per output channel
    np.testing.assert_allclose(qz.scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(qz.q, np.clip(np.round(w / scale), -127, 127).astype(np.int8))
    assert qz.q.dtype == np.int8 and np.abs(qz.q).max(axis=0).min() == 127  # every channel uses its range
    assert np.abs(qz.dequantize() - w).max() <= scale.max() / 2 + 1e-7


@pytest.mark.parametrize("block", [32, 64, 128])
def test_int4_blocks_match_reference(block: int) -> None:
    w = RNG.standard_normal((256, 12)).astype(np.float32)
    qz = quantize_int(w, 4, axis=0, block_size=block)
    assert qz.scale.shape == (256 // block, 12)
    for g in range(256 // block):  # each block of rows along K has its own scale per column
        rows = w[g * block:(g + 1) * block]
        scale = np.abs(rows).max(axis=0) / 7
        np.testing.assert_allclose(qz.scale[g], scale, rtol=1e-6)
        np.testing.assert_array_equal(qz.q[g * block:(g + 1) * block], np.round(rows / scale).astype(np.int8))
    assert qz.q.min() >= -8 and qz.q.max() <= 7
    np.testing.assert_allclose(qz.dequantize(), np.repeat(qz.scale, block, axis=0) * qz.q, rtol=1e-6)


def test_int4_blocks_on_the_embedding_axis() -> None:
    embedding = RNG.standard_normal((10, 64)).astype(np.float32)  # [V, H]: blocks along H
    by_rows = quantize_int(embedding, 4, axis=1, block_size=32)
    as_weight = quantize_int(embedding.T.copy(), 4, axis=0, block_size=32)  # the lm_head view [H, V]
    np.testing.assert_array_equal(by_rows.q, as_weight.q.T)
    np.testing.assert_allclose(by_rows.scale, as_weight.scale.T)


def test_block_must_divide() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int(np.ones((576, 4), np.float32), 4, axis=0, block_size=128)


def test_clip_shrinks_the_range() -> None:
    w = RNG.standard_normal((64, 4)).astype(np.float32)
    clipped = quantize_int(w, 4, axis=0, block_size=32, clip=np.full((2, 4), 0.5, np.float32))
    np.testing.assert_allclose(clipped.scale, quantize_int(w, 4, axis=0, block_size=32).scale * 0.5, rtol=1e-6)
    assert clipped.q.min() == -8 and clipped.q.max() == 7  # values beyond the clipped range saturate


def test_full_range_int4_is_onnxruntimes_symmetric_rounding() -> None:
    """full_range = ONNX Runtime's MatMulNBitsQuantizer / GenAI builder: the block's peak maps to -8, 16 levels."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    embedding = np.random.default_rng(5).standard_normal((40, 64)).astype(np.float32)  # [V, H] as GatherBlockQuantized
    ours = quantize_int(embedding, 4, axis=1, block_size=32, full_range=True)
    q, scale = DefaultWeightOnlyQuantizer.quant_slice_symmetric(embedding.reshape(-1, 32))
    np.testing.assert_allclose(ours.scale.reshape(-1), scale.reshape(-1), rtol=1e-6)
    np.testing.assert_array_equal(ours.q.reshape(-1, 32), q)
    assert (ours.scale < 0).any() and (ours.q == -8).sum() >= ours.scale.size  # every block's peak is -8
    plain = quantize_int(embedding, 4, axis=1, block_size=32)
    assert relative_error(embedding, ours.dequantize()) < relative_error(embedding, plain.dequantize())


def test_full_range_follows_the_axis_and_the_clip() -> None:
    w = np.random.default_rng(6).standard_normal((64, 6)).astype(np.float32)  # own generator: RNG's order stays
    by_k = quantize_int(w, 4, axis=0, block_size=32, full_range=True)
    by_rows = quantize_int(w.T.copy(), 4, axis=1, block_size=32, full_range=True)
    np.testing.assert_array_equal(by_k.q, by_rows.q.T)
    clipped = quantize_int(w, 4, axis=0, block_size=32, clip=np.full((2, 6), 0.5, np.float32), full_range=True)
    np.testing.assert_allclose(clipped.scale, by_k.scale * 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="needs blocks"):
        quantize_int(w, 4, axis=0, full_range=True)


def test_e4m3_rounding_matches_ml_dtypes() -> None:
    normal = RNG.standard_normal(20000).astype(np.float32) * np.exp2(RNG.integers(-12, 9, 20000))
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    midpoints = (np.sort(grid)[1:] + np.sort(grid)[:-1]) / 2  # ties: both must round half to even
    values = np.concatenate([normal, grid, midpoints, [0.0, -0.0, 2.0**-9, 2.0**-10, 448.0]]).astype(np.float32)
    values = values[np.abs(values) <= 448]
    expected = values.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(round_e4m3(values), expected)


def test_e4m3_saturates_like_quantize_linear() -> None:
    np.testing.assert_array_equal(round_e4m3(np.array([500.0, -1e6, 449.0], np.float32)), [448.0, -448.0, 448.0])
    assert np.isnan(round_e4m3(np.array([np.nan], np.float32)))[0]


def test_fp8_per_channel() -> None:
    w = RNG.standard_normal((32, 6)).astype(np.float32)
    qz = quantize_fp8(w, axis=1)
    np.testing.assert_allclose(qz.scale, np.abs(w).max(axis=0) / 448, rtol=1e-6)
    stored = (w / qz.scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(qz.q, stored)
    assert relative_error(w, qz.dequantize()) < 0.05


def test_fake_quant_tensor() -> None:
    x = np.array([0.0, 0.26, -1.0, 3.0], np.float32)
    np.testing.assert_allclose(fake_quant_tensor(x, 1 / 127, "int8"), [0.0, 33 / 127, -1.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(fake_quant_tensor(x, 1.0, "fp8"), round_e4m3(x))


def test_uint4_packing_round_trips() -> None:
    q = RNG.integers(-8, 8, size=(5, 64)).astype(np.int8)
    packed = pack_uint4(q)
    assert packed.shape == (5, 32) and packed.dtype == np.uint8
    assert packed[0, 0] == (q[0, 0] + 8) | ((q[0, 1] + 8) << 4)  # low nibble first
    np.testing.assert_array_equal(unpack_uint4(packed), q)


def _outlier_layer(k: int = 256, n: int = 128, rows: int = 512):
    """Activations with a few hot input channels (as in LLMs) feeding a random weight."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    hot = rng.choice(k, size=6, replace=False)
    x[:, hot] *= 40.0
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return x, w


def test_awq_scale_search_beats_round_to_nearest() -> None:
    x, w = _outlier_layer()
    found = awq_scale_search(x[:256], w, np.abs(x).mean(axis=0), block_size=32)
    held_out = x[256:]  # judge on rows the search did not see
    rtn = int4_output_error(held_out, w, fake_int4(w, 32))
    awq = int4_output_error(held_out, w, fake_int4(w * found.scale[:, None], 32) / found.scale[:, None])
    assert found.alpha > 0 and found.error_best < found.error_rtn
    assert awq < 0.7 * rtn, (awq, rtn)


def test_awq_clip_search_lowers_error_further() -> None:
    x, w = _outlier_layer()
    clip = awq_clip_search(x[:256], w, block_size=32)
    assert clip.shape == (256 // 32, 128) and clip.min() >= 0.55 and clip.max() <= 1.0 and clip.min() < 1.0
    held_out = x[256:]
    assert int4_output_error(held_out, w, fake_int4(w, 32, clip)) < int4_output_error(held_out, w, fake_int4(w, 32))


def test_awq_keeps_unit_scale_when_nothing_helps() -> None:
    x = np.ones((64, 64), np.float32)
    w = np.ones((64, 8), np.float32)  # exactly representable: no scale can lower a zero error
    found = awq_scale_search(x, w, np.ones(64, np.float32), block_size=32)
    assert found.alpha == 0.0 and np.all(found.scale == 1.0) and found.error_best == 0.0


def test_smoothquant_scale_formula_and_exactness() -> None:
    x, w = _outlier_layer()
    s = smoothquant_scale(np.abs(x).max(axis=0), w, alpha=0.5)
    expected = np.sqrt(np.abs(x).max(axis=0)) / np.sqrt(np.abs(w).max(axis=1))
    np.testing.assert_allclose(s, expected, rtol=1e-5)
    np.testing.assert_allclose((x / s) @ (w * s[:, None]), x @ w, rtol=1e-3, atol=1e-3)
    assert np.abs(x / s).max() < np.abs(x).max() / 5  # the outlier channels are flattened
