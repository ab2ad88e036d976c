"""calibrate: run the fp32 graph over calibration text and keep activation statistics for quantization.

The graph is not changed. Statistics are taken at every activation a later quantize pass may need::

    x [B,S,K] ─MatMul(W)─►          x: input of each MatMul with a constant weight (incl. the lm_head)
    k, v [B,S,Hkv·D] ─FlashAttention─►   k, v: the new keys/values written to the KV cache

and left in the pass context's ``results.calibration`` for 'quantize-int4' (AWQ search), 'quantize-int8'
(SmoothQuant, static scales), 'quantize-fp8' and 'quantize-kv-cache'. The token stream comes from
the build (``--calib-text`` or the built-in corpus, graphopt/quant/corpus/, ``--calib-tokens``) through the
pass context; rows of ``seq_len`` tokens run one ONNX Runtime call each, with a progress bar.

Options: ``seq_len`` (default 256) tokens per row; ``sample_rows`` (default 128) token rows kept per
activation for the AWQ searches. Letters: B batch, S seq, K channels, Hkv kv heads, D head dim.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.quant.text import rows
from graphopt.quant.calibration import collect
from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import find_embedding, find_linears
from graphopt.passes.base import GraphoptPass
from graphopt.plugins.flash_attention import is_flash_attention


def calibration_targets(graph: ir.Graph) -> list[str]:
    """Names of the activations the quantize passes read: MatMul inputs, lm_head input, cache K/V."""
    names = [lin.node.inputs[0].name for lin in find_linears(graph)]
    embedding = find_embedding(graph)
    if embedding is not None and embedding.lm_head is not None:
        names.append(embedding.lm_head.inputs[0].name)
    for node in graph:
        if is_flash_attention(node):
            names += [node.inputs[1].name, node.inputs[2].name]
    return list(dict.fromkeys(names))


class CalibratePass(GraphoptPass):
    """Run the fp32 graph on calibration tokens; keep per-activation statistics for quantize passes."""

    name = "calibrate"

    def __init__(self, seq_len: int = 256, sample_rows: int = 128) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.sample_rows = sample_rows

    def requires(self, model: ir.Model) -> None:
        if self.context.calibration_tokens is None:
            raise ir.passes.PreconditionError(
                "calibrate: no calibration tokens; build with 'graphopt build' (which reads --calib-text or the "
                "default prose) or pass PassContext(calibration_tokens=...) to run_pipeline")
        if self.seq_len < 2 or self.sample_rows < 1:
            raise PassError(f"calibrate: seq_len={self.seq_len}, sample_rows={self.sample_rows}; "
                            "use seq_len ≥ 2 and sample_rows ≥ 1")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        targets = calibration_targets(model.graph)
        token_rows = rows(self.context.calibration_tokens, self.seq_len)
        progress = self.context.progress
        description = f"calibrating on {sum(r.size for r in token_rows)} tokens"
        if progress is None:
            stats = collect(model, targets, token_rows, self.sample_rows, self.context.calibration_source)
        else:
            with progress.bar(description, total=len(token_rows)) as advance:
                stats = collect(model, targets, token_rows, self.sample_rows, self.context.calibration_source,
                                advance)
        self.context.results.calibration = stats
        self.count("tokens", stats.tokens)
        self.count("rows", stats.rows)
        self.count("activations", len(stats.values))
        return ir.passes.PassResult(model, False)
