"""Make the tiny random model CI compares on: ``python scripts/tiny_model.py DIR``.

Writes DIR/hf (a 2-layer tied Llama, hidden 128, from tests/tiny_models.py, with its final norm scaled by
LOGIT_SCALE so next-token distributions are peaked like a trained model's rather than near uniform, and
quantization error shows in KL and top-1) and DIR/words.txt (3000 words its word-level tokenizer knows, for
--calib-text / --eval-text). Deterministic: the same files each run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import VOCAB, make_tiny_model  # noqa: E402

LOGIT_SCALE = 3.0


def main(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    hf = make_tiny_model("llama", directory / "hf", tie_word_embeddings=True, hidden_size=128,
                         intermediate_size=256)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        model.model.norm.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(hf)
    words = np.random.default_rng(0).integers(4, VOCAB, 3000)
    (directory / "words.txt").write_text(" ".join(f"w{i}" for i in words))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_model.py DIR")
    main(Path(sys.argv[1]))
