"""Benchmark (not a test): the FlashAttention Triton kernel's batched decode vs torch SDPA on a CUDA GPU.

    .venv/bin/python scripts/bench_flash_attention.py

8 rows with ragged caches up to 1024 positions, GQA 9/3 heads of 64; prints both times and the ratio.
"""

from __future__ import annotations

import sys

import torch

from graphopt.plugins.flash_attention_triton import flash_attention


def main() -> None:
    """Benchmark, not a gate: batched decode (8 rows, ragged caches up to 1024) vs SDPA over the same caches."""
    heads, kv_heads, dim, capacity, batch = 9, 3, 64, 1024, 8
    make = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16)  # noqa: E731
    q3, k3, v3 = make(batch, 1, heads * dim), make(batch, 1, kv_heads * dim), make(batch, 1, kv_heads * dim)
    k_cache, v_cache = make(batch, kv_heads, capacity, dim), make(batch, kv_heads, capacity, dim)
    lens = torch.randint(100, capacity - 1, (batch,), device="cuda", dtype=torch.int32)
    k_full = k_cache.repeat_interleave(heads // kv_heads, 1)
    v_full = v_cache.repeat_interleave(heads // kv_heads, 1)
    mask = torch.arange(capacity, device="cuda")[None, None, None, :] <= lens[:, None, None, None]
    q4 = q3.view(batch, 1, heads, dim).transpose(1, 2)

    def timed(fn, reps: int = 200) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    ours = timed(lambda: flash_attention(q3, k3, v3, k_cache, v_cache, lens, heads, kv_heads, dim ** -0.5, 64, 64))
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q4, k_full, v_full, attn_mask=mask))
    print(f"decode b{batch}: triton {ours * 1e3:.1f} µs, SDPA {sdpa * 1e3:.1f} µs, ratio {sdpa / ours:.2f}x")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench_flash_attention: needs a CUDA GPU (torch.cuda is unavailable); run it on the GPU machine")
    main()
