"""The FlashAttention Triton kernel on a CUDA GPU against torch SDPA (causal, GQA, ragged cache).
Skipped on machines without a CUDA GPU; its throughput vs SDPA is scripts/bench_flash_attention.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="triton is not installed (pip install 'graphopt[trt]')")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda unavailable)")]


def _sdpa(q3, k_cache, v_cache, lens, seq, heads, kv_heads, scale):
    """Per row: SDPA of the S new queries over cache positions [0, lens[b]+S) with the causal offset."""
    batch, _, width = q3.shape
    dim = width // heads
    out = torch.empty_like(q3)
    for b in range(batch):
        total = int(lens[b]) + seq
        q = q3[b].view(seq, heads, dim).transpose(0, 1)
        k = k_cache[b, :, :total].repeat_interleave(heads // kv_heads, 0)
        v = v_cache[b, :, :total].repeat_interleave(heads // kv_heads, 0)
        mask = torch.arange(total, device=q.device)[None, :] <= (int(lens[b]) + torch.arange(seq, device=q.device))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale)
        out[b] = o[0].transpose(0, 1).reshape(seq, width)
    return out


@pytest.mark.parametrize("seq,lens", [(128, [0, 0]), (1, [100, 900]), (7, [3, 511])])
def test_kernel_matches_sdpa(seq: int, lens: list[int]) -> None:
    from graphopt.plugins.flash_attention_triton import flash_attention

    heads, kv_heads, dim, capacity = 9, 3, 64, 1024
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *s: torch.randn(*s, device="cuda", dtype=torch.float16, generator=gen)  # noqa: E731
    q3, k3, v3 = make(2, seq, heads * dim), make(2, seq, kv_heads * dim), make(2, seq, kv_heads * dim)
    k_cache, v_cache = make(2, kv_heads, capacity, dim), make(2, kv_heads, capacity, dim)
    cache_lens = torch.tensor(lens, device="cuda", dtype=torch.int32)
    out, k_cache, v_cache = flash_attention(q3, k3, v3, k_cache, v_cache, cache_lens, heads, kv_heads, dim ** -0.5,
                                            block_m=64, block_n=64)
    for b, start in enumerate(lens):
        assert torch.equal(k_cache[b, :, start:start + seq], k3[b].view(seq, kv_heads, dim).transpose(0, 1))
    expected = _sdpa(q3, k_cache, v_cache, lens, seq, heads, kv_heads, dim ** -0.5)
    assert float((out.float() - expected.float()).abs().max()) <= 2e-2
