"""The FlashAttention Triton kernel: numerics under TRITON_INTERPRET=1 (CPU) against the op's standard-ONNX
reference on ONNX Runtime — prefill, decode, GQA, ragged cache_lens, output and the in-place cache write —
and compilation to PTX for sm_90a without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.plugins.flash_attention import expand_reference

pytest.importorskip("triton", reason="triton is not installed (pip install 'graphopt[trt]')")
torch = pytest.importorskip("torch")

CAPACITY, D = 32, 16


# TRITON_INTERPRET is read when triton.jit decorates the kernel, so the interpreted runs happen in a fresh
# process: the cases go in as an .npz, the kernel's three outputs come back in another.
_RUNNER = """
import sys, numpy as np, torch
from graphopt.plugins.flash_attention_triton import flash_attention
cases = np.load(sys.argv[1])
out = {}
for name in sorted({k.split("/")[0] for k in cases.files}):
    arrays = [torch.from_numpy(cases[f"{name}/{i}"].copy()) for i in range(6)]
    heads, kv_heads, scale = (float(x) for x in cases[f"{name}/meta"])
    result = flash_attention(*arrays, int(heads), int(kv_heads), scale)
    assert result[1] is arrays[3] and result[2] is arrays[4], "present must alias past (in place)"
    for i, tensor in enumerate(result):
        out[f"{name}/{i}"] = tensor.float().numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Run every case through the kernel under TRITON_INTERPRET=1; returns {case: (out, present_k, present_v)}."""
    root = tmp_path_factory.mktemp("fa-interpret")
    cases = {}
    for name, (arrays, heads, kv_heads, scale) in _all_cases().items():
        cases |= {f"{name}/{i}": a for i, a in enumerate(arrays)}
        cases[f"{name}/meta"] = np.array([heads, kv_heads, scale], np.float64)
    np.savez(root / "in.npz", **cases)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(root / "in.npz"), str(root / "out.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(root / "out.npz")
    return {name: [out[f"{name}/{i}"] for i in range(3)] for name in _all_cases()}


def reference(q3, k3, v3, past_k, past_v, lens, heads: int, kv_heads: int, scale: float):
    """graphopt::FlashAttention through its standard-op expansion (TensorScatter + Attention) on ORT."""
    import onnxruntime as ort

    arrays = [q3, k3, v3, past_k, past_v, lens]
    names = ["q", "k", "v", "past_k", "past_v", "lens"]
    inputs = [ir.Value(name=n, type=ir.TensorType(ir.DataType.from_numpy(a.dtype)), shape=ir.Shape(a.shape))
              for n, a in zip(names, arrays)]
    node = ir.node("FlashAttention", inputs, domain="graphopt", num_outputs=3,
                   attributes={"num_heads": heads, "kv_num_heads": kv_heads, "scale": scale, "causal": 1,
                               "softcap": 0.0, "window": -1})
    for value, name in zip(node.outputs, ("out", "present_k", "present_v")):
        value.name = name
    model = ir.Model(ir.Graph(inputs, list(node.outputs), nodes=[node], opset_imports={"": 24, "graphopt": 1}),
                     ir_version=10)
    expand_reference(model)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(names, arrays)))


def _case(batch: int, seq: int, heads: int, kv_heads: int, lens: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    q3 = rng.normal(size=(batch, seq, heads * D)).astype(np.float32)
    k3, v3 = (rng.normal(size=(batch, seq, kv_heads * D)).astype(np.float32) for _ in range(2))
    past_k, past_v = (rng.normal(size=(batch, kv_heads, CAPACITY, D)).astype(np.float32) for _ in range(2))
    return q3, k3, v3, past_k, past_v, np.array(lens, np.int32)


CASES = {
    "prefill": (2, 7, 4, 4, [0, 0]),
    "prefill-gqa": (2, 20, 4, 2, [0, 0]),  # S > BLOCK_M: several query blocks, keys from k3 only
    "decode-ragged": (3, 1, 4, 2, [5, 17, 0]),
    "decode-mqa": (2, 1, 4, 1, [30, 9]),
    "chunked-ragged-gqa": (2, 5, 6, 2, [3, 21]),  # several tokens on top of different caches
}


def _all_cases() -> dict:
    scale = 1.0 / np.sqrt(D)
    cases = {name: (_case(b, s, h, kv, lens), h, kv, scale) for name, (b, s, h, kv, lens) in CASES.items()}
    fp16 = tuple(a.astype(np.float16) if a.dtype == np.float32 else a for a in _case(2, 3, 4, 2, [4, 11], seed=1))
    cases["fp16-ragged"] = (fp16, 4, 2, scale)
    return cases


@pytest.mark.parametrize("name", [*CASES, "fp16-ragged"])
def test_kernel_matches_reference(interpreted, name: str) -> None:
    arrays, heads, kv_heads, scale = _all_cases()[name]
    expected = reference(*[a.astype(np.float32) if a.dtype == np.float16 else a for a in arrays],
                         heads, kv_heads, scale)
    limit = 1e-2 if name.startswith("fp16") else 1e-5
    for got, want, what in zip(interpreted[name], expected, ("output", "present_key", "present_value")):
        diff = float(np.abs(got - want).max())
        assert diff <= limit, f"{name}: {what} differs from the reference by {diff:.3g}"


def test_compiles_to_ptx_for_sm90a() -> None:
    from graphopt.plugins.flash_attention_triton import compile_ptx

    kernel = compile_ptx(num_heads=9, kv_heads=3, head_dim=64, scale=0.125, dtype="float16", arch=90)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and f".entry {kernel.name}(" in ptx
    assert ptx.count(".param") >= 11  # 5 tensors + lens + seq + capacity + 3 outputs (+ scratch pointers)
