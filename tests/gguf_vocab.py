"""Tokenizers as GGUF metadata (``tokenizer.ggml.*``) for the tiny GGUF files of tests/gguf_files.py.

- ``bpe``: GPT-2 style byte-level BPE — the 256 byte symbols, one token per merge, ``<|endoftext|>``;
- ``llama`` / ``gemma``: sentencepiece with byte fallback — that family's control tokens, the 256 ``<0xNN>``
  byte tokens, then a few pieces with falling scores.
Each is what transformers' GGUF tokenizer converter reads for that ``tokenizer.ggml.model``.
"""

from __future__ import annotations

import dataclasses

import gguf

WORDS = ("▁", "t", "h", "e", "▁t", "he", "▁the")  # sentencepiece pieces, best first
MERGES = ("Ġ t", "h e", "Ġt he", "i n")  # byte-level BPE merges, best first


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """A tokenizer as GGUF metadata: ``tokenizer.ggml.*``."""

    model: str  # tokenizer.ggml.model: 'gpt2' (byte-level BPE) or 'llama' (sentencepiece with byte fallback)
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    ids: dict[str, int]  # bos / eos / pad / unk
    merges: list[str] = dataclasses.field(default_factory=list)  # BPE only
    scores: list[float] = dataclasses.field(default_factory=list)  # sentencepiece only


def byte_level_bpe() -> Vocabulary:
    """GPT-2 style: the 256 byte symbols, one token per merge, then the control token <|endoftext|>."""
    tokens = _byte_symbols() + [merge.replace(" ", "") for merge in MERGES] + ["<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    eos = len(tokens) - 1
    return Vocabulary("gpt2", tokens, types, dict(bos=eos, eos=eos, pad=eos), merges=list(MERGES))


def _byte_symbols() -> list[str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the others for chr(256 + n), in order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


def sentencepiece(specials: tuple[str, ...]) -> Vocabulary:
    """Llama / Gemma style: control tokens (one of them <unk>), the 256 <0xNN> byte tokens, then WORDS."""
    tokens = list(specials) + [f"<0x{byte:02X}>" for byte in range(256)] + list(WORDS)
    types = ([gguf.TokenType.UNKNOWN if t == "<unk>" else gguf.TokenType.CONTROL for t in specials]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(WORDS))
    scores = [0.0] * (len(specials) + 256) + [-float(rank) for rank in range(len(WORDS))]
    named = {"bos": ("<s>", "<bos>"), "eos": ("</s>", "<eos>"), "pad": ("<pad>", "</s>"), "unk": ("<unk>",)}
    ids = {role: next(tokens.index(t) for t in names if t in specials) for role, names in named.items()}
    return Vocabulary("llama", tokens, types, ids, scores=scores)


VOCABULARIES = {"bpe": byte_level_bpe(), "llama": sentencepiece(("<unk>", "<s>", "</s>")),
                "gemma": sentencepiece(("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"))}
