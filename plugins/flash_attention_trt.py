"""TensorRT registration of graphopt::FlashAttention (v1) through TensorRT's Python plugin API, ahead of time.

    ONNX node graphopt::FlashAttention(q3, k3, v3, past_k, past_v, cache_lens)
        plugin_namespace="graphopt", plugin_version="1"
      ─► TensorRT plugin "graphopt::FlashAttention"
           shapes   output like q3 [B,S,H·D]; present_k/present_v aliased to past_k/past_v (in place)
           formats  q/k/v/caches in the compute dtype (fp16 or bf16), cache_lens int32, all linear
           AOT      the Triton kernel compiled to PTX at engine build (plugins.flash_attention_triton);
                    grid (ceil(S / BLOCK_M), B·H), extra scalars S and T — the engine embeds the PTX and
                    needs no Python at run time

Importing this module registers the plugin when ``tensorrt.plugin`` is importable (a GPU machine
with TensorRT ≥ 10.8); ``graphopt engine`` imports it for artifacts whose manifest lists the plugin.
Everything except the decorators is plain functions of shapes (:func:`output_descs`,
:func:`launch_grid`, :func:`aot_kernel`), tested on the CPU with stand-in descriptors.
Letters: B batch, S new tokens, T cache capacity, H/Hkv heads, D head dim.
"""

from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

PLUGIN_ID = "graphopt::FlashAttention"
BLOCK_M = BLOCK_N = 64
NUM_WARPS = 4
DTYPES = {"FP16": "float16", "BF16": "bfloat16"}


def output_descs(query, past_key, past_value):
    """(output, present_key, present_value): the output like the query, the presents aliasing the pasts."""
    return query.like(), past_key.aliased(), past_value.aliased()


def cdiv(a, b: int):
    """Ceiling division that also works on TensorRT's symbolic shape expressions."""
    return (a + (b - 1)) // b


def launch_grid(batch, seq, num_heads: int, block_m: int = BLOCK_M):
    """(grid_x, grid_y) of the kernel for batch B and S new tokens (ints or symbolic expressions)."""
    return cdiv(seq, block_m), batch * num_heads


def aot_kernel(num_heads: int, kv_heads: int, head_dim: int, scale: float, dtype: str, arch: int = 90):
    """(kernel name, PTX text, shared memory bytes, threads per block) for the Triton kernel."""
    from graphopt.plugins.flash_attention_triton import compile_ptx

    compiled = compile_ptx(num_heads, kv_heads, head_dim, scale, dtype=dtype, arch=arch, block_m=BLOCK_M,
                           block_n=BLOCK_N, num_warps=NUM_WARPS)
    return compiled.name, compiled.asm["ptx"], compiled.metadata.shared, NUM_WARPS * 32


def register(trtp) -> None:
    """Register the plugin's shape descriptor, formats and AOT implementation with ``trtp`` (tensorrt.plugin)."""

    @trtp.register(PLUGIN_ID)
    def _desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
              past_value: trtp.TensorDesc, cache_lens: trtp.TensorDesc, num_heads: int, kv_num_heads: int,
              scale: float, causal: int, softcap: float, window: int):
        return output_descs(query, past_key, past_value)

    @trtp.autotune(PLUGIN_ID)
    def _formats(query, key, value, past_key, past_value, cache_lens, num_heads: int, kv_num_heads: int,
                 scale: float, causal: int, softcap: float, window: int, outputs):
        return [trtp.AutoTuneCombination(f"{t}, {t}, {t}, {t}, {t}, INT32, {t}, {t}, {t}", "LINEAR")
                for t in DTYPES]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(query, key, value, past_key, past_value, cache_lens, num_heads: int, kv_num_heads: int,
             scale: float, causal: int, softcap: float, window: int, outputs, tactic):
        if window > 0 or softcap != 0:  # lower-trt keeps such nodes standard; refuse rather than compute wrong
            raise ValueError(f"{PLUGIN_ID}: the kernel has no sliding window/softcap (window {window}, softcap "
                             f"{softcap}); rebuild the artifact with --attention standard")
        dtype = "bfloat16" if "bfloat16" in str(query.dtype).lower() else "float16"
        head_dim = int(past_key.shape_expr[3])
        name, ptx, shared, threads = aot_kernel(num_heads, kv_num_heads, head_dim, scale, dtype)
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y = launch_grid(query.shape_expr[0], query.shape_expr[1], num_heads)
        launch.block_x, launch.shared_mem = threads, shared
        extra = trtp.SymIntExprs(2)
        extra[0] = trtp.SymInt32(query.shape_expr[1])  # seq
        extra[1] = trtp.SymInt32(past_key.shape_expr[2])  # capacity
        return name, ptx, launch, extra


def register_if_available() -> bool:
    """Register with TensorRT when its Python plugin API is importable; False (and a debug log) otherwise."""
    try:
        trtp = importlib.import_module("tensorrt.plugin")
    except ImportError:
        log.debug("tensorrt.plugin is not importable; graphopt::FlashAttention is not registered")
        return False
    register(trtp)
    return True


REGISTERED = register_if_available()
