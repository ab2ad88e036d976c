"""Run a graph from any stage of the pipeline on ONNX Runtime, on an empty KV cache.

Used by ``--verify`` (passes/verify.py), calibration (graphopt/quant/calibration.py) and ``compare --bisect``
(graphopt/evaluate/bisect.py): each needs the logits (or tapped activations) of a graph that may still hold
``graphopt::FlashAttention``, so the graph is copied, FlashAttention is expanded to its standard-op reference
(plugins/flash_attention.py), and the cache inputs are fed as zeros.

    session = reference_session(model)
    logits = session.run(["logits"], empty_cache_feeds(session, input_ids))[0]   # [B, S, V]
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphopt.core.errors import PassError

# ONNX Runtime type strings of the cache inputs a graph can declare, as numpy dtypes
_CACHE_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": ml_dtypes.bfloat16,
                 "tensor(float8e4m3fn)": ml_dtypes.float8_e4m3fn, "tensor(int8)": np.int8}


def reference_session(model: ir.Model, mutate=None):
    """An ORT CPU session for a copy of ``model`` with FlashAttention expanded; ``model`` is not changed.

    ``mutate(copy)``, if given, edits the copy first (calibration taps activations this way). Int4 Q/DQ
    keeps its exact meaning: ORT would otherwise fuse DQ+MatMul into MatMulNBits with int8 activations.
    """
    import onnxruntime as ort

    from graphopt.plugins.flash_attention import expand_reference

    runnable = ir.from_proto(ir.to_proto(model))
    if mutate is not None:
        mutate(runnable)
    expand_reference(runnable)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(ir.to_proto(runnable).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def empty_cache_feeds(session, input_ids: np.ndarray, capacity: int | None = None) -> dict[str, np.ndarray]:
    """Feeds for ``input_ids`` [B, S] as new tokens on empty caches; logits at every position.

    A cache input with a static length (a trt graph) keeps it; a dynamic one gets ``capacity`` (default S).
    """
    batch, seq = input_ids.shape
    positions = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
    fixed = {"input_ids": input_ids.astype(np.int64), "position_ids": positions, "logit_positions": positions,
             "cache_lens": np.zeros(batch, np.int32), "input_lens": np.full(batch, seq, np.int32)}
    feeds = {}
    for spec in session.get_inputs():
        if spec.name in fixed:
            feeds[spec.name] = fixed[spec.name]
        elif spec.name.startswith("past_") and spec.type in _CACHE_DTYPES:  # [B, Hkv, capacity, D]
            _, heads, length, dim = spec.shape
            length = length if isinstance(length, int) else (capacity or seq)
            feeds[spec.name] = np.zeros((batch, heads, length, dim), _CACHE_DTYPES[spec.type])
        else:
            raise PassError(f"no test value for graph input {spec.name!r} ({spec.type}); the reference run feeds "
                            f"only the artifact I/O contract with float or int8 caches")
    return feeds
