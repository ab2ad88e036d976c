"""Text for calibration and evaluation: a user's file, or the corpus kept in this package.

The default corpus (``graphopt/quant/corpus/``, see its README.md) is English prose written for
graphopt and released with it under the public-domain dedication CC0 1.0: ``calibration.txt`` (about
4,200 SmolLM2 tokens, more than ``CALIB_TOKENS``) and ``evaluation.txt`` (about 2,270 tokens, more than
``EVAL_TOKENS``), two disjoint sets of paragraphs on different subjects. It is a fixed file, so a
fidelity figure (KL, top-1) does not move when an installed package changes; every build report and
compare.json records the sha256 of the text it used (:meth:`Corpus.to_json`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from graphopt.core.errors import GraphoptError

CALIB_TOKENS = 4096  # default calibration tokens (build, compare)
EVAL_TOKENS = 2048  # default evaluation tokens: fidelity vs fp32 (build, eval, compare)
MIN_TOKENS = 64
CORPUS_DIR = Path(__file__).with_name("corpus")
CORPUS_NAME = "graphopt-prose-1"  # bump the number whenever a file in corpus/ changes
SPLITS = ("calibration", "evaluation")


class CalibrationTextError(GraphoptError):
    """Calibration or evaluation text is missing, empty, not UTF-8 or too short."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    text: str
    source: str  # "file:PATH" or "graphopt-prose-1 (calibration split)"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict[str, str]:
        """What a report records about the text: where it came from and the sha256 of its UTF-8 bytes."""
        return {"source": self.source, "sha256": self.sha256}


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
    """A split of the corpus kept in this package; ``split`` is "calibration" or "evaluation"."""
    if split not in SPLITS:
        raise CalibrationTextError(f"no corpus split {split!r}; use one of {list(SPLITS)}")
    path = CORPUS_DIR / f"{split}.txt"
    if not path.is_file():
        raise CalibrationTextError(f"the built-in corpus file {path} is missing; reinstall graphopt "
                                   "(pip install -e .) or pass --calib-text / --eval-text FILE")
    return Corpus(path.read_text(encoding="utf-8"), f"{CORPUS_NAME} ({split} split)")


def default_corpus_sha256() -> dict[str, str]:
    """The sha256 of each split of the built-in corpus (recorded in every build report)."""
    return {split: default_corpus(split).sha256 for split in SPLITS}


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
