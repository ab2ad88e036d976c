"""Tiny pre-quantized GGUF files for the --keep-quant tests: tests/gguf_files.py's tiny Llama (2 layers,
hidden 64, F32 tensors) with its 2-D projections written in a chosen block type by gguf-py's own quantizer
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 — the types it can write; another type is written as zero blocks, for
the header-only checks) and the embedding in another. The head (``output``) is a projection here."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from gguf_files import ARCHS, VOCABULARIES, _add_hyperparameters, _add_tokenizer, _gguf_tensors, source_model

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")
WRITABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def write_quantized_gguf(path: Path, kind: str, embedding: str = "Q8_0", seed: int = 0) -> Path:
    """The tiny Llama with every projection in ``kind`` and the (tied) embedding in ``embedding``
    (a block type, or "F32"/"F16")."""
    spec, model = ARCHS["llama"], source_model("llama", seed)
    writer = gguf.GGUFWriter(path, spec.gguf_arch)
    writer.add_name(spec.name)
    _add_hyperparameters(writer, model.config, spec)
    _add_tokenizer(writer, VOCABULARIES[spec.vocab])
    for name, array in _gguf_tensors(model, spec.gguf_arch):
        leaf = name.split(".")[-2]
        chosen = embedding if name == "token_embd.weight" else kind if leaf in PROJECTIONS else "F32"
        _add(writer, name, np.ascontiguousarray(array, dtype=np.float32), chosen)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer: gguf.GGUFWriter, name: str, array: np.ndarray, kind: str) -> None:
    if kind in ("F32", "F16"):
        writer.add_tensor(name, array.astype(np.float16 if kind == "F16" else np.float32))
        return
    qtype = gguf.GGMLQuantizationType[kind]
    if kind in WRITABLE:
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        return
    per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]  # a type gguf-py cannot write: zero blocks of its size
    writer.add_tensor(name, np.zeros((array.shape[0], array.shape[1] // per_block * nbytes), np.uint8),
                      raw_dtype=qtype)
