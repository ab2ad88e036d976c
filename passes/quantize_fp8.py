"""quantize-fp8: float8 e4m3fn weights per output channel, activations static per tensor (calibrated).

    before:  x [B,S,K] ─MatMul─► y                          W [K,N] fp32
    after:   x ─QuantizeLinear(a, 0 e4m3)─DQ─► x̂ ─MatMul─► y
             weight DequantizeLinear(W_q e4m3 [K,N], scale [N], axis=1)
    before:  Gather(E [V,H], ids)   MatMul(h, Transpose(E))            (tied lm_head)
    after:   E → DequantizeLinear(E_q e4m3 [V,H], scale [V], axis=0) for both readers;
             the lm_head input h gets its own activation Q/DQ

Activation scales are amax / 448 from the 'calibrate' pass, amax being the calibration maximum
(``calibration = "max"``) or the mean 99.99th percentile of |x| (``"percentile"``, which clips rare
outliers). This is the explicit-quantization graph TensorRT builds fp8 engines from; ONNX Runtime's
CPU EP has no fp8 kernels, so on ort-cpu the same graph is a fidelity simulation in fp32.

Options: ``calibration`` "max" (default) | "percentile"; ``activations`` (default true) adds the
activation Q/DQ (false: weight-only fp8); ``embedding`` (default true); ``keep``: layer names or shell
patterns (``["lm_head", "model.layers.0.*"]``, see :func:`graphopt.passes._quant_graph.layer_name`) whose
MatMuls stay fp32 — weights and their input activation (``graphopt build --kl-budget`` fills it).
Letters: B batch, S seq, K/N in/out channels, V vocab, H hidden.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import (Linear, calibration, dequantize_node, drop_unused,
                                          weight_targets, kept_count, group_by_input, quantize_group_input,
                                          record_precision)
from graphopt.passes.base import GraphoptPass
from graphopt.quant.numerics import quantize_fp8, tensor_scale


class QuantizeFp8Pass(GraphoptPass):
    """fp8 e4m3 Q/DQ: per-channel weights, calibrated per-tensor activations (TensorRT's form)."""

    name = "quantize-fp8"
    lossy = True

    def __init__(self, calibration: str = "max", activations: bool = True, embedding: bool = True,
                 keep: list[str] | None = None) -> None:
        super().__init__()
        self.keep = list(keep or ())
        self.calibration = calibration
        self.activations = activations
        self.embedding = embedding

    def requires(self, model: ir.Model) -> None:
        if self.calibration not in ("max", "percentile"):
            raise PassError(f"quantize-fp8: calibration {self.calibration!r} is unknown; use 'max' or 'percentile'")
        if self.activations:
            calibration(self.context, self.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        linears, embedding, fp32 = weight_targets(graph, self.embedding, self.keep)
        if not linears and embedding is None:
            return ir.passes.PassResult(model, False)
        if kept := kept_count(graph, linears, embedding, self.embedding):
            self.count("kept_fp32", kept)
        for lin in linears:
            qz = quantize_fp8(lin.array, axis=1)
            lin.node.replace_input_with(1, dequantize_node(graph, lin.node, qz, lin.weight.name))
            self.count("matmuls")
        if embedding is not None:
            qz = quantize_fp8(embedding.array, axis=0)
            embedding.table.replace_all_uses_with(dequantize_node(graph, graph.node(0), qz, embedding.table.name))
            self.count("embedding")
        if self.activations:
            heads = [Linear(embedding.lm_head)] if embedding is not None and embedding.lm_head is not None else []
            for name, group in group_by_input(linears + heads).items():
                quantize_group_input(graph, group, self._scale(model, name), "fp8")
                self.count("activation_quantizers")
        drop_unused(graph, fp32)
        record_precision(self.context, self.stats, weights="fp8 e4m3 per-channel",
                         activations=f"fp8 e4m3 static per-tensor ({self.calibration})" if self.activations
                         else "fp32", embedding="fp8 e4m3 per-row" if embedding else "fp32")
        return ir.passes.PassResult(model, True)

    def _scale(self, model: ir.Model, name: str) -> float:
        x = calibration(self.context, self.name).get(name)
        if x is None:
            raise PassError(f"quantize-fp8: no calibration statistics for {name!r}; put 'calibrate' right "
                            "before 'quantize-fp8' in the recipe")
        return float(tensor_scale(x.percentile if self.calibration == "percentile" else x.amax, "fp8"))
