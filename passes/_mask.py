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


def mask_window(graph: ir.Graph, mask: ir.Value, additive: bool, hint: int = -1) -> int | str:
    """What ``mask`` allows, read by running it: -1 for plain causal, W > 0 for causal with a sliding
    window of W keys (query q sees keys q-W+1 … q), or the reason it is neither.

    ``hint`` (the model's configured window, when it has one) adds a sequence length just past it so
    a window is seen even when it is longer than the default probe lengths; layers of one model may
    differ (Gemma 2/3, gpt-oss alternate sliding and global layers), so each mask is read on its own.
    """
    try:
        session, feeds_for = _session(graph, mask)
    except _Unreadable as exc:
        return str(exc)
    sizes = sorted({5, 17} | ({min(hint + 3, 9000)} if hint > 0 else set()))
    found = -1
    for seq in reversed(sizes):  # the longest first: it shows a window when there is one
        (value,) = session.run(None, feeds_for(seq))
        if additive and not np.all((value == 0) | (value <= -1e4)):
            return "additive mask holds values other than 0 and a large negative number"
        allowed = (value == 0) if additive else value.astype(bool)
        allowed = np.broadcast_to(allowed, allowed.shape[:-2] + (seq, seq)).reshape(-1, seq, seq)
        if seq == sizes[-1]:  # the first, longest probe: its last query row shows the window
            last = int(allowed[0, -1].sum())
            found = last if 0 < last < seq else -1
        if not all(np.array_equal(a, _causal(seq, found)) for a in allowed):
            kind = "causal" if found <= 0 else f"causal with a sliding window of {found}"
            return f"mask is not {kind} at seq {seq} (a padding, prefix-LM or bidirectional mask?)"
    return found


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
