"""llama.cpp as a peer: the artifact's source GGUF run by llama.cpp itself (the ``llama-cpp-python`` binding),
same prompt, same greedy loop, same thread count — ``graphopt bench ART --vs llamacpp``.

llama.cpp runs the file's own block types (Q4_1 stays Q4_1), so for a ``--keep-quant`` artifact both engines
hold the same weights. It does not multiply them at full precision: its CPU dot products quantize each
activation block to 8 bits first (Q8_0 / Q8_1 / Q8_K, chosen by the weight type), as ONNX Runtime's
``MatMulNBits`` does at accuracy_level 4. :func:`llamacpp_logits` gives its logits at every position, so
``scripts/bench_keep_quant.py`` measures that cost as KL against the fp32 model.

llama-cpp-python is not a dependency: PyPI ships it as source only, and building it compiles llama.cpp
(about 6 minutes on 2 cores), so ``--vs llamacpp`` says how to install it when it is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import BenchError
from graphopt.sources.gguf_weights import quantized_types

INSTALL = "pip install llama-cpp-python (PyPI has source only: it compiles llama.cpp, ~6 min on 2 cores)"


def source_gguf(source: Any) -> Path:
    """The .gguf file llama.cpp runs: the artifact's own source file; only GGUF sources have one."""
    if getattr(source, "gguf_path", None) is None:
        raise BenchError(f"--vs llamacpp runs the artifact's source GGUF, but '{source.spec}' is not a GGUF "
                         "file; build the artifact from a .gguf (or a built-in GGUF name) to compare with llama.cpp")
    return Path(source.gguf_path)


def open_llama(gguf: Path, threads: int, n_ctx: int, logits_all: bool = False) -> Any:
    """A llama.cpp context on ``gguf`` (CPU, ``threads`` for decode and prompt, memory-mapped, quiet)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise BenchError(f"--vs llamacpp needs llama.cpp's Python binding: {INSTALL}") from None
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                 n_threads_batch=threads, n_gpu_layers=0, logits_all=logits_all, verbose=False)


def llama_calls(llm: Any) -> tuple[Callable[[Sequence[int]], int], Callable[[int], int]]:
    """(``first(prompt)``, ``step(token)``) for :func:`graphopt.measure.bench.timed_loop`: greedy argmax of
    the last position's logits; ``first`` starts a fresh sequence (``reset`` drops the cached tokens).

    The logits are read from the context itself: without ``logits_all`` the binding (0.3.x) leaves
    ``llm.scores`` at zero, so an argmax there is always token 0."""
    from llama_cpp import llama_get_logits_ith

    vocab = llm.n_vocab()

    def last_argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def first(prompt: Sequence[int]) -> int:
        llm.reset()
        llm.eval(list(prompt))
        return last_argmax()

    def step(token: int) -> int:
        llm.eval([int(token)])
        return last_argmax()

    return first, step


def llamacpp_logits(gguf: Path, threads: int, max_seq: int) -> Callable[[np.ndarray], np.ndarray]:
    """Logits at every position of one row (a fresh sequence per row): a
    :data:`graphopt.measure.fidelity.Logits` for ``evaluate``."""
    llm = open_llama(gguf, threads, max_seq, logits_all=True)

    def run(row: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in row])
        return np.array(llm.scores[:row.size], dtype=np.float32)

    return run


def llamacpp_precision(gguf: Path) -> str:
    """What llama.cpp runs: the file's quantized 2-D tensor types with their counts, e.g. ``gguf 211 Q4_1``."""
    counts, _ = quantized_types(gguf)
    return "gguf " + ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) if counts else "gguf float"


def with_llamacpp(precisions: dict[str, Any], gguf: Path | None) -> dict[str, Any]:
    """Add llama.cpp's precision to bench's ``peer_precision`` (when it ran), and a ``precision_mismatch`` line
    unless the artifact holds the GGUF's own blocks (a ``--keep-quant`` build)."""
    if gguf is None:
        return precisions
    precisions["peer_precision"]["llamacpp"] = peer = llamacpp_precision(gguf)
    weights = precisions["precision"]
    if not (weights.startswith("gguf ") and "kept exactly" in weights):
        precisions["precision_mismatch"].append(
            f"llamacpp runs the source GGUF's own blocks ('{peer}'); the artifact's weights are '{weights}' "
            "(build with --keep-quant for the same weights)")
    return precisions
