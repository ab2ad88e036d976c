"""Decode cost of a mixture-of-experts artifact against a dense model of the same active size.

    .venv/bin/python scripts/bench_moe.py [--repeats 7] [--steps 32]

Two random-weight models with the same attention and the same active MLP width: Mixtral-shaped (8
experts of width I, top-2) and Llama-shaped (one MLP of width 2·I). The MoE model is built twice, with
``--experts routed`` and ``--experts dense`` (graphopt/build/experts.py); all three are built for ort-cpu;
decode steps at batch 1 and batch 8 are timed in interleaved rounds (routed, dense-experts, dense model,
…), and the script prints each one's ms per step (median, min–max) and its ratio to the dense model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_models import tiny_tokenizer  # noqa: E402

from graphopt.build.artifact import BuildOptions, build  # noqa: E402
from graphopt.passes.pipeline import load_recipe  # noqa: E402
from graphopt.core.progress import QUIET  # noqa: E402
from graphopt.runtime.engine_api import open_engine  # noqa: E402
from graphopt.runtime.engine_api import Engine  # noqa: E402

SHAPE = dict(vocab_size=2048, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
EXPERT_WIDTH = 1024


def _save(config, directory: Path) -> Path:
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tiny_tokenizer(directory, config.vocab_size)
    return directory


def _artifacts(root: Path) -> dict[str, Path]:
    moe = transformers.MixtralConfig(**SHAPE, intermediate_size=EXPERT_WIDTH, num_local_experts=8,
                                     num_experts_per_tok=2, sliding_window=None)
    dense = transformers.LlamaConfig(**SHAPE, intermediate_size=2 * EXPERT_WIDTH)
    sources = {"moe": _save(moe, root / "moe-hf"), "dense": _save(dense, root / "dense-hf")}
    out = {}
    for name, source, experts in (("moe-routed", "moe", "routed"), ("moe-dense", "moe", "dense"),
                                  ("dense-model", "dense", "routed")):
        build(str(sources[source]), BuildOptions(load_recipe("ort-cpu"), root / name, experts=experts), QUIET)
        out[name] = root / name
    return out


def _step_ms(engine: Engine, batch: int, steps: int) -> float:
    """Mean ms per decode step of ``batch`` rows after a 64-token prompt each."""
    while engine.cache.num_active:
        engine.cache.free(engine.cache.num_active - 1)
    rng = np.random.default_rng(0)
    slots = [engine.cache.allocate() for _ in range(batch)]
    engine.prefill([rng.integers(3, 2048, size=64).tolist() for _ in slots], slots)
    tokens = rng.integers(3, 2048, size=batch)
    engine.decode(tokens)  # warm
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode(tokens)
    return (time.perf_counter() - start) * 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        engines = {name: open_engine(path, max_slots=8, max_seq=256) for name, path in _artifacts(Path(tmp)).items()}
        for batch in (1, 8):
            times: dict[str, list[float]] = {name: [] for name in engines}
            for _ in range(args.repeats):
                for name, engine in engines.items():
                    times[name].append(_step_ms(engine, batch, args.steps))
            for name, values in times.items():
                ratios = [v / d for v, d in zip(values, times["dense-model"])]
                print(f"batch {batch} {name:11}: median {statistics.median(values):.2f} ms/step "
                      f"(min {min(values):.2f}, max {max(values):.2f}); vs dense model "
                      f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}) "
                      f"over {args.repeats} interleaved rounds")


if __name__ == "__main__":
    main()
