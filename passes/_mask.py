"""Read what an attention mask subgraph computes, by running it.

The traced forward takes only ``input_ids`` and ``position_ids``, so a mask can depend on
nothing else; we extract its subgraph, run it on ONNX Runtime for a few sequence lengths
(positions 0..S-1 per row) and compare it with the causal (optionally sliding-window) pattern.
This is robust to however the exporter or transformers builds the mask.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_MAX_CONST_BYTES = 1 << 20


def mask_kind(graph: ir.Graph, mask: ir.Value, additive: bool, window: int = -1) -> str | None:
    """None if ``mask`` is causal (with ``window`` when > 0) for every row; else the reason it is not."""
    try:
        session, feeds_for = _session(graph, mask)
    except _Unreadable as exc:
        return str(exc)
    sizes = (5, 9) if window <= 0 else (5, min(window + 3, 9000))
    for seq in sizes:
        (value,) = session.run(None, feeds_for(seq))
        allowed = (value == 0) if additive else value.astype(bool)
        if additive and not np.all((value == 0) | (value <= -1e4)):
            return "additive mask holds values other than 0 and a large negative number"
        expected = _causal(seq, window)
        allowed = np.broadcast_to(allowed, allowed.shape[:-2] + (seq, seq)).reshape(-1, seq, seq)
        if not all(np.array_equal(a, expected) for a in allowed):
            kind = "causal" if window <= 0 else f"causal with window {window}"
            return f"mask is not {kind} at seq {seq}"
    return None


def _causal(seq: int, window: int) -> np.ndarray:
    q = np.arange(seq)[:, None]
    k = np.arange(seq)[None, :]
    allowed = k <= q
    if window > 0:
        allowed &= k > q - window
    return allowed


class _Unreadable(Exception):
    pass


def _session(graph: ir.Graph, mask: ir.Value):
    import onnxruntime as ort

    inputs = [v for v in graph.inputs if v.name in ("input_ids", "position_ids")]
    try:
        sub = ir.convenience.extract(graph, inputs=inputs, outputs=[mask])
    except ValueError as exc:
        raise _Unreadable(f"mask subgraph depends on more than input_ids/position_ids ({exc})") from None
    for init in sub.initializers.values():
        if init.const_value is not None and init.const_value.nbytes > _MAX_CONST_BYTES:
            raise _Unreadable(f"mask subgraph reads a large constant {init.name!r}")
    model = ir.Model(sub, ir_version=10)
    model.opset_imports.update(graph.opset_imports)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def feeds(seq: int) -> dict[str, np.ndarray]:
        positions = np.tile(np.arange(seq, dtype=np.int64), (2, 1))
        table = {"input_ids": np.zeros((2, seq), np.int64), "position_ids": positions}
        return {name: table[name] for name in names}

    return session, feeds
