"""Text for calibration and evaluation: a user's file, or prose found on this machine at run time.

The default corpus is the long descriptions (README text) in the ``METADATA`` of the Python
packages installed here, filtered to prose paragraphs (no code, tables or headers). Paragraphs
are split between calibration and evaluation by a hash of their text, so the two never overlap
and the split does not depend on the order packages were installed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import re
from pathlib import Path

import numpy as np

from graphopt.core.errors import GraphoptError

CALIB_TOKENS = 4096  # default calibration tokens (build, compare)
EVAL_TOKENS = 2048  # default evaluation tokens: fidelity vs fp32 (build, eval, compare)
MIN_PARAGRAPH_CHARS = 160
MIN_TOKENS = 64
_CODE_START = re.compile(r"^\s*(```|>>>|\$ |\.\. |[|#=*+\-`<{\[]|\d+\.\s)")


class CalibrationTextError(GraphoptError):
    """Calibration or evaluation text is missing, empty, not UTF-8 or too short."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    text: str
    source: str  # "file:PATH" or "installed-package-docs (N packages)"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def read_text_file(path: Path, flag: str) -> Corpus:
    """The UTF-8 text of ``path``; a one-line error naming ``flag`` when it cannot be used."""
    if not path.is_file():
        raise CalibrationTextError(f"{flag} {path}: no such file; pass a UTF-8 text file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationTextError(f"{flag} {path} is not UTF-8 (byte {exc.start}); convert it, e.g. "
                                   f"'iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt'") from None
    if not text.strip():
        raise CalibrationTextError(f"{flag} {path} is empty; pass a file with some prose (a few pages or more)")
    return Corpus(text, f"file:{path}")


def default_corpus(split: str) -> Corpus:
    """Prose from installed packages' METADATA; ``split`` is "calibration" or "evaluation"."""
    paragraphs, packages = [], set()
    for dist in sorted(importlib.metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        for paragraph in prose_paragraphs(_long_description(dist)):
            if _split_of(paragraph) == split:
                paragraphs.append(paragraph)
                packages.add(dist.metadata.get("Name"))
    if not paragraphs:
        raise CalibrationTextError("found no prose in the installed packages' documentation; "
                                   "pass --calib-text FILE (any UTF-8 prose)")
    return Corpus("\n\n".join(paragraphs), f"installed-package-docs ({len(packages)} packages, {split} split)")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs that read as English sentences: long enough, mostly letters, no code or markup lines."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines or any(_CODE_START.match(line) or line.startswith("    ") for line in lines):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
        if len(paragraph) >= MIN_PARAGRAPH_CHARS and letters >= 0.85 * len(paragraph) and ". " in paragraph:
            out.append(paragraph)
    return out


def _long_description(dist: importlib.metadata.Distribution) -> str:
    body = dist.metadata.get_payload() if hasattr(dist.metadata, "get_payload") else None
    return str(body or dist.metadata.get("Description") or "")


def _split_of(paragraph: str) -> str:
    digest = hashlib.sha256(paragraph.encode("utf-8")).digest()
    return "calibration" if digest[0] % 2 == 0 else "evaluation"


def token_stream(tokenizer, corpus: Corpus, limit: int, flag: str) -> np.ndarray:
    """The corpus tokenized (no special tokens) and cut to ``limit`` ids; int64 [n]."""
    if limit < MIN_TOKENS:
        raise CalibrationTextError(f"{flag} {limit} is too small; use at least {MIN_TOKENS} tokens")
    ids = np.asarray(tokenizer(corpus.text, add_special_tokens=False)["input_ids"], dtype=np.int64)[:limit]
    if ids.size < MIN_TOKENS:
        raise CalibrationTextError(f"the text from {corpus.source} has only {ids.size} tokens; "
                                   f"pass a longer file (at least {MIN_TOKENS} tokens)")
    return ids


def rows(ids: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Split a token stream into rows of ``seq_len`` (the last row may be shorter, but not below 2)."""
    out = [ids[i:i + seq_len] for i in range(0, ids.size, seq_len)]
    return [row for row in out if row.size >= 2]
