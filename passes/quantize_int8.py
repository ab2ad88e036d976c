"""quantize-int8: int8 weights (per output channel or blocked), int8 activations (dynamic, static or in-kernel).

    before:  x [B,S,K] ─MatMul─► y                 W [K,N] fp32
    after:   x ─DynamicQuantizeLinear─DQ─► x̂ ─MatMul─► y    (activations = "dynamic": uint8, per call)
             x ─QuantizeLinear(a, 0)─DQ─► x̂ ─MatMul─► y     (activations = "static": int8, a calibrated)
             x ─────────────────────────► MatMul─► y        (activations = "none": weight-only Q/DQ;
                                                              MatMulNBits quantizes x per block itself)
             weight DequantizeLinear(W_q int8 [K,N], scale [N], axis=1)            (block_size 0)
                 or DequantizeLinear(W_q int8 [K,N], scale [K/b,N], axis=0, block_size=b)

MatMuls sharing an input (q/k/v, gate/up) share one activation quantizer. The token embedding and
the tied lm_head become DQ(E_q int8 [V,H], scale [V,H/e], axis=1, block_size=e): 'lower-quant-ort-cpu'
runs both from the same bytes (GatherBlockQuantized, MatMulNBits 8-bit), so the lm_head keeps fp32
activations in the Q/DQ graph (MatMulNBits quantizes them per block itself). With
``smoothquant_alpha`` > 0 each shared input first gets SmoothQuant's per-channel scale
s = max|x|^α / max|W|^(1-α), folded into the input's producer (RMSNorm weight or the up projection),
so activation outliers move into the weights. Static scales and SmoothQuant need a 'calibrate' pass.

Options: ``activations`` "dynamic" (default) | "static" | "none"; ``block_size`` 0 (per channel,
default) or a power of two dividing K; ``smoothquant_alpha`` 0 (off) … 1; ``static_range`` "max" |
"percentile" (99.99th); ``embedding`` (default true); ``embedding_block_size`` e = 64; ``keep``: layer
names or shell patterns left fp32 (see quantize-int4).
Letters: B batch, S seq, K/N in/out channels, V vocab, H hidden, b/e block sizes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.quant.awq import smoothquant_scale
from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import (Linear, calibration, dequantize_node, drop_unused,
                                          weight_targets, kept_count, fold_input_scale, group_by_input,
                                          quantize_group_input, record_precision)
from graphopt.passes.base import GraphoptPass
from graphopt.quant.numerics import quantize_int, tensor_scale


class QuantizeInt8Pass(GraphoptPass):
    """int8 Q/DQ: per-channel or blocked weights; dynamic, static or in-kernel activations; SmoothQuant."""

    name = "quantize-int8"
    lossy = True

    def __init__(self, activations: str = "dynamic", block_size: int = 0, smoothquant_alpha: float = 0.0,
                 static_range: str = "max", embedding: bool = True, embedding_block_size: int = 64,
                 keep: list[str] | None = None) -> None:
        super().__init__()
        self.keep = list(keep or ())  # layer names / shell patterns left fp32 (weights and input activation)
        self.activations = activations
        self.block_size = block_size
        self.smoothquant_alpha = smoothquant_alpha
        self.static_range = static_range
        self.embedding = embedding
        self.embedding_block_size = embedding_block_size

    def requires(self, model: ir.Model) -> None:
        if self.activations not in ("dynamic", "static", "none") or self.static_range not in ("max", "percentile"):
            raise PassError(f"quantize-int8: activations={self.activations!r}, static_range={self.static_range!r}; "
                            "use activations 'dynamic', 'static' or 'none' and static_range 'max' or 'percentile'")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise PassError(f"quantize-int8: block_size {self.block_size} is not 0 (per channel) or a power of two "
                            "≥ 16; use 0, 32, 64 or 128")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise PassError(f"quantize-int8: smoothquant_alpha {self.smoothquant_alpha} is outside [0, 1]; "
                            "0 turns SmoothQuant off, 0.5 is the usual choice")
        if self.activations == "static" or self.smoothquant_alpha > 0:
            calibration(self.context, self.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        linears, embedding, fp32 = weight_targets(graph, self.embedding, self.keep)
        if not linears and embedding is None:
            return ir.passes.PassResult(model, False)
        if kept := kept_count(graph, linears, embedding, self.embedding):
            self.count("kept_fp32", kept)
        groups = group_by_input(linears)
        # all folds first: smoothing the down projection rescales the (still fp32) up projection's columns
        smoothing = {name: self._smooth(graph, model, name, group) for name, group in groups.items()}
        for name, group in groups.items():
            for lin in group:
                lin.node.replace_input_with(1, dequantize_node(graph, lin.node, self._weight(lin), lin.weight.name))
                self.count("matmuls")
            if self.activations != "none":
                quantize_group_input(graph, group, self._static_scale(model, name, smoothing[name]), "int8")
                self.count(f"{self.activations}_activation_quantizers")
        if embedding is not None:
            self._quantize_embedding(graph, embedding)
        drop_unused(graph, fp32)
        smooth = f", SmoothQuant α={self.smoothquant_alpha}" if self.smoothquant_alpha > 0 else ""
        weights = f"int8 block {self.block_size} symmetric" if self.block_size else "int8 per-channel symmetric"
        activations = f"int8 {self.activations} per-tensor{smooth}" if self.activations != "none" else \
            f"fp32 in the Q/DQ graph{smooth}"
        record_precision(self.context, self.stats, weights=weights, activations=activations,
                         embedding=f"int8 block {self.embedding_block_size}" if embedding else "fp32")
        return ir.passes.PassResult(model, True)

    def _weight(self, lin: Linear):
        """Per output channel (block_size 0), or blocks along K like int4 (MatMulNBits 8-bit)."""
        if not self.block_size:
            return quantize_int(lin.array, 8, axis=1)
        if lin.array.shape[0] % self.block_size:
            raise PassError(f"quantize-int8: block_size {self.block_size} does not divide the input dimension "
                            f"{lin.array.shape[0]} of MatMul {lin.node.name!r}; use a divisor (32 or 64) or 0")
        return quantize_int(lin.array, 8, axis=0, block_size=self.block_size)

    def _smooth(self, graph: ir.Graph, model: ir.Model, name: str, group: list[Linear]) -> np.ndarray | None:
        """SmoothQuant's scale for one shared input, folded into its producer; None when off or impossible."""
        if self.smoothquant_alpha <= 0:
            return None
        x = calibration(self.context, self.name).get(name)
        if x is None:
            self.note(f"quantize-int8: no calibration statistics for {name!r}; not smoothed")
            return None
        weights = np.concatenate([lin.array for lin in group], axis=1)
        s = smoothquant_scale(x.max_abs, weights, self.smoothquant_alpha)
        if fold_input_scale(graph, group[0].node.inputs[0], group, s) is None:
            self.count("smoothquant_unfoldable_inputs")
            return None
        self.count("smoothquant_inputs")
        return s

    def _static_scale(self, model: ir.Model, name: str, smoothing: np.ndarray | None) -> float | None:
        if self.activations == "dynamic":
            return None
        x = calibration(self.context, self.name).get(name)
        if x is None:
            raise PassError(f"quantize-int8: no calibration statistics for {name!r}; put 'calibrate' right "
                            "before 'quantize-int8' in the recipe")
        if smoothing is not None:  # the input is now x / s: its range shrinks channel by channel
            amax = float((x.max_abs / smoothing).max())
            ratio = x.percentile / x.amax if x.amax else 1.0
            return float(tensor_scale(amax * (ratio if self.static_range == "percentile" else 1.0), "int8"))
        return float(tensor_scale(x.percentile if self.static_range == "percentile" else x.amax, "int8"))

    def _quantize_embedding(self, graph: ir.Graph, embedding) -> None:
        hidden = embedding.array.shape[1]
        if self.embedding_block_size < 16 or hidden % self.embedding_block_size:
            raise PassError(f"quantize-int8: embedding_block_size {self.embedding_block_size} does not divide the "
                            f"hidden size {hidden}; set it to a power of two ≥ 16 that divides {hidden}")
        qz = quantize_int(embedding.array, 8, axis=1, block_size=self.embedding_block_size)
        embedding.table.replace_all_uses_with(dequantize_node(graph, graph.node(0), qz, embedding.table.name))
        self.count("embedding")
        if embedding.lm_head is not None:
            self.count("tied_lm_head")
