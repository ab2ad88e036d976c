"""A Triton kernel for graphopt::FlashAttention: FlashAttention-2 style forward against the slot KV cache.

One launch does the op: grid (ceil(S / BLOCK_M), B·H); each program owns BLOCK_M queries of one
(row b, head h), streams keys in BLOCK_N blocks with an online softmax (running max m, sum l,
fp32 accumulator), and — for the first query head of each kv group — writes its new K/V rows into
the cache at [cache_lens[b], cache_lens[b]+S)::

    query  q3 [B,S,H·D]   key, value k3, v3 [B,S,Hkv·D]   cache_lens int32 [B]
    cache  past_k, past_v [B,Hkv,T,D]  (present_* alias them: updated in place)
    key t < cache_lens[b]        read from the cache (written by earlier calls)
    key t ≥ cache_lens[b]        read from k3/v3 directly (so no program waits for another's write)
    query j (position cache_lens[b]+j) sees keys t ≤ cache_lens[b]+j            (causal, GQA: h → h·Hkv/H)

Letters: B batch, S new tokens, T cache capacity, H/Hkv heads, D head dim (a power of two).
``TRITON_INTERPRET=1`` runs it on the CPU (numpy) for tests; :func:`compile_ptx` compiles it for a GPU
arch without one (the TensorRT plugin's ahead-of-time implementation).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)  # finite "minus infinity": fully masked rows stay NaN-free


@triton.jit
def _load_kv(K, V, KC, VC, b, kvh, start, offs_n, seq, capacity, offs_d, HKV: tl.constexpr, D: tl.constexpr):
    """Keys/values of positions offs_n: the cache below ``start``, the call's new rows from ``start`` on."""
    in_cache = offs_n < start
    new_idx = offs_n - start
    in_new = (offs_n >= start) & (new_idx < seq) & (offs_n < capacity)
    cached = ((b * HKV + kvh) * capacity + offs_n[:, None]) * D + offs_d[None, :]
    new = (b * seq + new_idx[:, None]) * (HKV * D) + kvh * D + offs_d[None, :]
    k = tl.where(in_cache[:, None], tl.load(KC + cached, mask=in_cache[:, None], other=0.0),
                 tl.load(K + new, mask=in_new[:, None], other=0.0))
    v = tl.where(in_cache[:, None], tl.load(VC + cached, mask=in_cache[:, None], other=0.0),
                 tl.load(V + new, mask=in_new[:, None], other=0.0))
    return k, v, in_cache | in_new


@triton.jit
def flash_attention_kernel(Q, K, V, KC, VC, LENS, seq, capacity, OUT, KC_OUT, VC_OUT,
                           H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SCALE: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    m_block = tl.program_id(0)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    kvh = h // (H // HKV)
    start = tl.load(LENS + b).to(tl.int32)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < seq
    q = tl.load(Q + (b * seq + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if h % (H // HKV) == 0:  # one query head per kv group writes the new rows
        slot = start + offs_m
        ok = (row_ok & (slot < capacity))[:, None]
        new = (b * seq + offs_m[:, None]) * (HKV * D) + kvh * D + offs_d[None, :]
        cached = ((b * HKV + kvh) * capacity + slot[:, None]) * D + offs_d[None, :]
        tl.store(KC_OUT + cached, tl.load(K + new, mask=ok, other=0.0), mask=ok)
        tl.store(VC_OUT + cached, tl.load(V + new, mask=ok, other=0.0), mask=ok)
    q_pos = start + offs_m
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum(start + tl.minimum((m_block + 1) * BLOCK_M, seq), capacity)  # causal upper bound
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k, v, valid = _load_kv(K, V, KC, VC, b, kvh, start, offs_n, seq, capacity, offs_d, HKV, D)
        s = tl.dot(q, tl.trans(k)) * SCALE
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & valid[None, :], s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + (b * seq + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])


def flash_attention(q3, k3, v3, past_key, past_value, cache_lens, num_heads: int, kv_heads: int, scale: float,
                    block_m: int = 16, block_n: int = 16):
    """Run the kernel on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1); caches updated in place.

    Returns (output [B,S,H·D], past_key, past_value) — the same objects as the op's three outputs.
    """
    import torch

    batch, seq, width = q3.shape
    capacity, head_dim = past_key.shape[2], past_key.shape[3]
    out = torch.empty_like(q3)
    grid = (triton.cdiv(seq, block_m), batch * num_heads)
    flash_attention_kernel[grid](q3, k3, v3, past_key, past_value, cache_lens, seq, capacity, out, past_key,
                                 past_value, H=num_heads, HKV=kv_heads, D=head_dim, SCALE=scale,
                                 BLOCK_M=block_m, BLOCK_N=block_n)
    return out, past_key, past_value


TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def kernel_signature(dtype: str) -> dict[str, str]:
    """Argument types of the kernel: inputs, then the scalars seq and capacity, then outputs."""
    t = f"*{TRITON_TYPES[dtype]}"
    return {"Q": t, "K": t, "V": t, "KC": t, "VC": t, "LENS": "*i32", "seq": "i32", "capacity": "i32",
            "OUT": t, "KC_OUT": t, "VC_OUT": t}


def compile_ptx(num_heads: int, kv_heads: int, head_dim: int, scale: float, dtype: str = "float16",
                arch: int = 90, block_m: int = 64, block_n: int = 64, num_warps: int = 4):
    """Compile the kernel for sm_<arch> (90 → sm_90a) without a GPU; returns triton's CompiledKernel
    (``.asm["ptx"]``, ``.name``, ``.metadata.shared``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {"H": num_heads, "HKV": kv_heads, "D": head_dim, "SCALE": scale, "BLOCK_M": block_m,
                  "BLOCK_N": block_n}
    signature = kernel_signature(dtype) | {k: "constexpr" for k in constexprs}
    source = ASTSource(fn=flash_attention_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
