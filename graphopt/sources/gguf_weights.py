"""The pre-quantized weights of a GGUF file, for ``graphopt build MODEL.gguf --keep-quant``.

    GGUF tensor (Q4_1, Q8_0, …: raw blocks)  ──decode──►  BlockQuant (int4/int8 blocks, scale, offset)
                                              ──gguf-py dequantize──►  fp32 values, as transformers loads them
    QuantizedWeights.by_content: fingerprint(fp32 values) → (GGUF name, BlockQuant)

The 'keep-quant' pass finds each traced weight by the fingerprint of its values, so it needs no name mapping
between GGUF, Hugging Face and the ONNX export; the row order transformers' loader changes (llama's rotary
q/k rows) is applied to the blocks too — rows only, and blocks run along a row, so it is exact. Every
tensor's blocks are checked against gguf-py's dequantization bit for bit while reading.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from graphopt.core.errors import SourceError
from graphopt.quant.gguf_blocks import EXACT_TYPES, STORED, BlockQuant, NoExactForm, decode
from graphopt.sources.files import check_gguf_header, one_line

FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
_FIX = "build without --keep-quant (the weights are dequantized to fp32 and can be re-quantized with --int4/--int8)"


@dataclasses.dataclass(frozen=True)
class QuantizedWeights:
    """A GGUF's quantized 2-D tensors, keyed by the fingerprint of the fp32 values the traced graph holds."""

    path: Path
    by_content: dict[str, tuple[str, BlockQuant]]
    types: dict[str, int]  # GGUF type → tensor count (quantized ones)
    gguf_bytes: int
    kind: str = "gguf"  # the precision's first word: gguf, or gptq / awq (a Hugging Face checkpoint, hf_quant)


def fingerprint(values: np.ndarray) -> str:
    """blake2b of an fp32 array's shape and bytes (row-major)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    digest = hashlib.blake2b(str(values.shape).encode(), digest_size=20)
    digest.update(values.data)
    return digest.hexdigest()


def quantized_types(path: Path) -> tuple[dict[str, int], tuple[str, str] | None]:
    """Cheap look at the header: the count per quantized type of 2-D tensors, and the first 2-D tensor kept in a
    float type (name, type) — no tensor data is read."""
    counts: collections.Counter[str] = collections.Counter()
    first_float = None
    for tensor in _reader(path).tensors:
        if len(tensor.shape) != 2:
            continue
        kind = tensor.tensor_type.name
        if kind in FLOAT_TYPES:
            first_float = first_float or (tensor.name, kind)
        else:
            counts[kind] += 1
    return dict(counts), first_float


def keep_quant_hint(path: Path) -> str | None:
    """One line for a plain build of a quantized GGUF: what ``--keep-quant`` would keep and save; None when
    the file has no pre-quantized weights or a type with no exact form."""
    counts, sizes = collections.Counter(), {"fp32": 0, "kept": 0}
    for tensor in _reader(path).tensors:
        kind, n = tensor.tensor_type.name, int(tensor.n_elements)
        sizes["fp32"] += 4 * n
        if len(tensor.shape) == 2 and kind not in FLOAT_TYPES:
            if kind not in STORED:
                return None
            bits, block, offset = STORED[kind]
            counts[kind] += 1
            sizes["kept"] += n * bits // 8 + n // block * 4 * (2 if offset else 1)
        else:
            sizes["kept"] += 4 * n
    if not counts:
        return None
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    mib = {k: v / (1 << 20) for k, v in sizes.items()}
    return (f"{path.name} holds pre-quantized weights ({types} tensors); --keep-quant keeps them exactly as the "
            f"file has them (no second rounding; weights ≈ {mib['kept']:.0f} MiB instead of {mib['fp32']:.0f} MiB "
            f"in fp32; the file is {path.stat().st_size / (1 << 20):.0f} MiB)")


def check_keep_quant(path: Path) -> dict[str, int]:
    """One-line SourceError when ``--keep-quant`` cannot apply: no quantized weights, or a type with no
    exact form. Returns the count per type."""
    counts, first_float = quantized_types(path)
    if not counts:
        name, kind = first_float or ("(none)", "no 2-D tensor")
        raise SourceError(f"--keep-quant: '{path.name}' holds no pre-quantized weights (tensor '{name}' is {kind}); "
                          f"{_FIX}")
    for tensor in _reader(path).tensors:
        kind = tensor.tensor_type.name
        if len(tensor.shape) == 2 and kind not in FLOAT_TYPES and kind not in EXACT_TYPES:
            raise SourceError(f"--keep-quant: tensor '{tensor.name}' in '{path.name}' is {kind}, which has no exact "
                              f"int4/int8 block form (kept exactly: {', '.join(EXACT_TYPES)}); {_FIX}")
    return counts


def refuse_unquantized_folder(folder: Path) -> None:
    """--keep-quant on a Hugging Face folder: one line naming its first tensor and that tensor's type."""
    import json

    name, kind = "(none)", "no tensor"
    for path in sorted(folder.glob("*.safetensors"))[:1]:
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        name, entry = next(((k, v) for k, v in header.items() if k != "__metadata__"), (name, {"dtype": kind}))
        kind = entry["dtype"]
    raise SourceError(f"--keep-quant: '{folder}' is a Hugging Face folder, not a pre-quantized GGUF (tensor "
                      f"'{name}' is {kind}); {_FIX}")


def read_quantized(path: Path) -> QuantizedWeights:
    """Decode every quantized 2-D tensor of ``path`` (see the module docstring)."""
    import gguf

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    found: dict[str, tuple[str, BlockQuant]] = {}
    types: collections.Counter[str] = collections.Counter()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if len(tensor.shape) != 2 or kind in FLOAT_TYPES:
            continue
        cols = int(tensor.shape[0])
        raw = np.asarray(tensor.data).reshape(-1, np.asarray(tensor.data).shape[-1])
        try:
            blocks = decode(kind, raw, cols)
        except NoExactForm:
            raise SourceError(f"--keep-quant: tensor '{tensor.name}' in '{path.name}' is {kind}, which has no exact "
                              f"int4/int8 block form (kept exactly: {', '.join(EXACT_TYPES)}); {_FIX}") from None
        reference = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(raw.shape[0], cols)
        order = _loader_row_order(arch, tensor.name, raw.shape[0], heads, kv_heads)
        if order is not None:
            blocks, reference = blocks.permute_rows(order), reference[order]
        _check_exact(blocks, reference, tensor.name, kind)
        found[fingerprint(reference)] = (tensor.name, blocks)
        types[kind] += 1
    return QuantizedWeights(path, found, dict(types), path.stat().st_size)


def _check_exact(blocks: BlockQuant, reference: np.ndarray, name: str, kind: str) -> None:
    differ = int(np.count_nonzero(blocks.dequantize().view(np.uint32) != reference.view(np.uint32)))
    if differ:
        raise SourceError(f"--keep-quant: tensor '{name}' ({kind}): its int4/int8 blocks differ from gguf's "
                          f"dequantized values in {differ} places, so it has no exact form here; {_FIX}")


def _loader_row_order(arch: str, name: str, rows: int, heads: int | None, kv_heads: int | None) -> np.ndarray | None:
    """The row order transformers' GGUF loader gives llama's q/k weights (undoing llama.cpp's rotary
    permutation): new row i is file row order[i]."""
    if arch != "llama" or not heads or not (".attn_q." in name or ".attn_k." in name):
        return None
    n_head = heads if ".attn_q." in name else kv_heads
    return np.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows)


def _reader(path: Path):
    import gguf

    check_gguf_header(path)
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise SourceError(f"cannot read GGUF '{path}': {one_line(exc)}; the file may be truncated: copy it again") \
            from exc


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    return value if not isinstance(value, list) else (value[0] if len(set(value)) == 1 else max(value))
