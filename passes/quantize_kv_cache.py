"""quantize-kv-cache: fp8 or int8 keys and values in the KV cache, one calibrated scale per layer and tensor.

    before:  k, v [B,S,Hkv·D] ─────────────────────────► FlashAttention(q, k, v, past_k, past_v, lens)
    after:   k ─QuantizeLinear(s_k, 0)─DequantizeLinear─► FlashAttention(q, k̂, v̂, …)
             v ─QuantizeLinear(s_v, 0)─DequantizeLinear─►

Every cached value passes through the Q/DQ when it is written, so the cache holds exactly the
values an fp8/int8 cache would (s = amax / 448 for e4m3, amax / 127 for int8, amax from the
'calibrate' pass on the new keys after RoPE and the new values of each layer). TensorRT stores the
quantized tensor; on ort-cpu GroupQueryAttention keeps float32 buffers, so there it simulates the
precision (no memory saved). Letters: B batch, S seq, Hkv kv heads, D head dim.

Options: ``dtype`` "fp8" (default) | "int8".
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import calibration, quantize_activation, record_precision
from graphopt.passes.base import GraphoptPass
from graphopt.plugins.flash_attention import is_flash_attention
from graphopt.quant.numerics import tensor_scale


class QuantizeKVCachePass(GraphoptPass):
    """Q/DQ on the keys and values written to the cache (per-layer scales)."""

    name = "quantize-kv-cache"
    lossy = True

    def __init__(self, dtype: str = "fp8") -> None:
        super().__init__()
        self.dtype = dtype

    def requires(self, model: ir.Model) -> None:
        if self.dtype not in ("fp8", "int8"):
            raise PassError(f"quantize-kv-cache: dtype {self.dtype!r} is unknown; use --kv-cache fp8 or int8")
        calibration(self.context, self.name)
        attention = [n for n in model.graph if is_flash_attention(n)]
        if not attention or any(len(n.inputs) < 6 for n in attention):
            raise ir.passes.PreconditionError(
                "quantize-kv-cache: no FlashAttention with cache inputs; run 'fuse-attention' and "
                "'insert-kv-cache' first, and put 'quantize-kv-cache' before 'lower-ort-cpu'")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stats = calibration(self.context, self.name)
        for node in [n for n in model.graph if is_flash_attention(n)]:
            for index in (1, 2):
                x = node.inputs[index]
                found = stats.get(x.name)
                if found is None:
                    raise PassError(f"quantize-kv-cache: no calibration statistics for {x.name!r} of "
                                    f"{node.name!r}; put 'calibrate' after 'insert-kv-cache'")
                scale = float(tensor_scale(found.amax, self.dtype))
                node.replace_input_with(index, quantize_activation(model.graph, x, scale, self.dtype))
            self.count("layers")
        name = "fp8 e4m3" if self.dtype == "fp8" else "int8"
        record_precision(self.context, kv_cache=f"{name} per-layer scales (simulated on ort-cpu: float32 buffers)")
        return ir.passes.PassResult(model, bool(self.stats))
