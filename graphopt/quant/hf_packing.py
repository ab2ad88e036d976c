"""GPTQ and AWQ packings (Hugging Face checkpoints) → integer blocks that reproduce the weights exactly.

    one quantized Linear (K inputs, N outputs, G groups of b inputs), as the checkpoint stores it:
    GPTQ  qweight int32 [K·bits/32, N]  packed along K, lowest bits first
          qzeros  int32 [G, N·bits/32]  packed along N, lowest bits first; "gptq" (v1) stores zero−1, read back
                                        per field + 1 as AutoGPTQ does (a stored 15 is 16); "gptq_v2" stores zero
          scales  fp16  [G, N]          g_idx int32 [K]: the group of each input (act-order: not k // b)
    AWQ   qweight int32 [K, N/8]        packed along N, 4 bits, nibble i of word c holds column 8c + AWQ_ORDER[i]
          qzeros  int32 [G, N/8]        the same packing (zero stored as is); scales fp16 [G, N]; g(k) = k // b

          W[k, n] = scale[g(k), n] · (q[k, n] − zero[g(k), n])            (HF's Linear weight is W.T, [N, K])

    kept as BlockQuant (rows = N, blocks of b along K, zero-point 0):
          q' = q − 2^(bits−1)  (int4 / int8),   scale,   offset = scale · (2^(bits−1) − zero)
          offset is None where every zero is 2^(bits−1) (symmetric GPTQ): q' is then the whole weight.
          act-order: inputs sorted by group (stable), so each block is one group; ``input_order`` records it.

Exact: fp16 scale (11 significant bits) times an integer of ≤ 9 bits fits fp32, so scale·q' and the offset
are exact in fp32 and their float64 sum is exactly scale·(q − zero): BlockQuant.dequantize() is the weight.
"""

from __future__ import annotations

import numpy as np

from graphopt.quant.gguf_blocks import BlockQuant

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i] of its 8


class PackingError(ValueError):
    """Tensors that do not agree with the packing (the caller names the layer and the fix)."""


def unpack_along_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] → int32 [R·32/bits, C]: row r·(32/bits) + j is bits j·bits … of row r."""
    words = packed.view(np.uint32)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    values = (words[:, None, :] >> shifts[None, :, None]) & np.uint32((1 << bits) - 1)
    return values.reshape(-1, packed.shape[1]).astype(np.int32)


def unpack_along_cols(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 [R, C] → int32 [R, C·32/bits]: column c·(32/bits) + j is bits j·bits … of column c."""
    words = packed.view(np.uint32)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    values = (words[:, :, None] >> shifts[None, None, :]) & np.uint32((1 << bits) - 1)
    return values.reshape(packed.shape[0], -1).astype(np.int32)


def awq_unpack(packed: np.ndarray) -> np.ndarray:
    """AWQ "gemm" 4-bit words [R, C] → values [R, 8C] in column order (undoing AWQ_ORDER)."""
    nibbles = unpack_along_cols(packed, 4).reshape(packed.shape[0], -1, 8)
    values = np.empty_like(nibbles)
    values[:, :, list(AWQ_ORDER)] = nibbles
    return values.reshape(packed.shape[0], -1)


def gptq_layer(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
               bits: int, group: int, v1: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """q [K, N], zero [G, N], scale [G, N] (fp32), group of each input [K] of one GPTQ Linear."""
    q = unpack_along_rows(qweight, bits)
    zero = unpack_along_cols(qzeros, bits) + (1 if v1 else 0)
    k, n = q.shape
    groups = np.arange(k) // group if g_idx is None else g_idx.astype(np.int64).reshape(-1)
    _agree(scales.shape, zero.shape, (scales.shape[0], n), groups.shape, (k,), "qzeros")
    if groups.size and (groups.min() < 0 or groups.max() >= scales.shape[0]):
        raise PackingError(f"g_idx holds groups {groups.min()}…{groups.max()}, outside the {scales.shape[0]} groups "
                           "of scales")
    return q, zero, scales.astype(np.float32), groups


def awq_layer(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
              group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """q [K, N], zero [G, N], scale [G, N] (fp32), group of each input [K] of one AWQ "gemm" Linear."""
    q, zero = awq_unpack(qweight), awq_unpack(qzeros)
    k, n = q.shape
    groups = np.arange(k) // group
    _agree(scales.shape, zero.shape, (-(-k // group), n), groups.shape, (k,), "qzeros")
    return q, zero, scales.astype(np.float32), groups


def _agree(scales: tuple, zeros: tuple, expected: tuple, groups: tuple, k: tuple, name: str) -> None:
    if tuple(scales) != tuple(expected) or tuple(zeros) != tuple(expected) or tuple(groups) != tuple(k):
        raise PackingError(f"scales {list(scales)} and unpacked {name} {list(zeros)} should both be "
                           f"{list(expected)} (groups × outputs) for qweight's {k[0]} inputs")


def reference_weight(q: np.ndarray, zero: np.ndarray, scale: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """W [K, N] = scale[g(k)]·(q − zero[g(k)]) in float64, as fp32 (the definition; the tests' reference)."""
    return (scale.astype(np.float64)[groups] * (q - zero[groups])).astype(np.float32)


def to_blocks(q: np.ndarray, zero: np.ndarray, scale: np.ndarray, groups: np.ndarray, bits: int,
              kind: str) -> BlockQuant:
    """One layer's unpacked tensors as rows-of-blocks (see the module docstring); PackingError when the groups
    are not ``b`` inputs each (b = K / G), so no block form exists."""
    k = q.shape[0]
    count = zero.shape[0]
    if k % count:
        raise PackingError(f"{k} inputs do not split into {count} equal groups")
    block = k // count
    order = None
    if not np.array_equal(groups, np.arange(k) // block):
        order = np.argsort(groups, kind="stable")
        if not np.array_equal(groups[order], np.arange(k) // block):
            raise PackingError(f"g_idx puts a different number of inputs than {block} in some group")
        q = q[order]
    half = 1 << (bits - 1)
    offset = None if np.all(zero == half) else np.ascontiguousarray((scale * (half - zero).astype(np.float32)).T)
    return BlockQuant(np.ascontiguousarray((q - half).T.astype(np.int8)), np.ascontiguousarray(scale.T), offset,
                      bits, block, kind, input_order=order)


def hf_weight(blocks: BlockQuant) -> np.ndarray:
    """The fp32 [N, K] weight a Hugging Face Linear holds: BlockQuant.dequantize() in input order."""
    values = blocks.dequantize()
    if blocks.input_order is None:
        return values
    weight = np.empty_like(values)
    weight[:, blocks.input_order] = values
    return weight
