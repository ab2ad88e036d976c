"""Benchmark (not a test): speculative verification of B rows of k+1 tokens over a cache on an ort-cpu artifact.

    .venv/bin/python scripts/bench_verify.py ARTIFACT [-k 4] [--batch 2 4 8] [--cache 200] [--repeats 20]

Per batch size, in the same run and on the same engine: one plain batched decode step (GQA, 1 token per row),
per-row verification (one GQA call of k+1 tokens per row, what artifacts without model_verify.onnx do) and
one batched call on the multi-token graph (model_verify.onnx). Prints medians in ms and the ratio
per-row / batched.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from graphopt.runtime.engine_api import open_engine
from graphopt.runtime.speculative import SampleLog, SpecConfig, Speculator


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (and, for the multi-token graph, its session's creation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--cache", type=int, default=200, help="tokens already cached per row (ragged ±50%%)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    slots = max(args.batch)
    engine = open_engine(args.artifact, max_slots=slots, max_seq=2 * args.cache + args.k + 8)
    spec = Speculator(SpecConfig(method="ngram", num_speculative_tokens=args.k, adaptive=False), engine, args.artifact)
    rng = np.random.default_rng(0)
    lens = rng.integers(args.cache // 2, args.cache * 3 // 2, size=slots)
    for n in lens:
        engine.prefill([rng.integers(4, engine.vocab_size, size=int(n)).tolist()], [engine.cache.allocate()])
    chunk, log = [7] * (args.k + 1), SampleLog()

    def rolled_back(fn):
        def run():
            fn()
            engine.cache.lens[:slots] = lens
        return run

    print(f"{args.artifact}: k={args.k}, caches {lens.min()}..{lens.max()}, multi-token graph: "
          f"{engine.capabilities.multi_row_multi_token}")
    print(f"{'batch':>5} {'decode':>9} {'per-row':>9} {'batched':>9} {'per-row/batched':>16}")
    for batch in args.batch:
        rows = list(range(batch))
        decode = _median_ms(rolled_back(lambda: engine.decode([7] * batch)), args.repeats)
        per_row = _median_ms(rolled_back(lambda: [spec.verify(r, chunk, log) for r in rows]), args.repeats)
        batched = (_median_ms(rolled_back(lambda: spec.verify_rows(rows, [chunk] * batch, log)), args.repeats)
                   if engine.capabilities.multi_row_multi_token else float("nan"))
        print(f"{batch:>5} {decode:>9.1f} {per_row:>9.1f} {batched:>9.1f} {per_row / batched:>16.2f}")


if __name__ == "__main__":
    main()
