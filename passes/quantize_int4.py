"""quantize-int4: weight-only int4, blocks along the input channels, AWQ-style scale search.

Every MatMul with a constant weight, and the token embedding (with the lm_head tied to it)::

    before:  x [B,S,K] ─MatMul─► y            W [K,N] fp32
    after:   x [B,S,K] ─MatMul─► y            DequantizeLinear(W_q int4 [K,N], scale [K/b,N], axis=0,
                                                  block_size=b)  zero-point 0 (TensorRT's form)
    before:  Gather(E [V,H], input_ids)       MatMul(h, Transpose(E))           (tied lm_head)
    after:   Gather(DQ(E_q int4, scale [V,H/b], axis=1, block_size=b), …)  MatMul(h, Transpose(DQ(…)))

With ``method = "awq"`` (needs a 'calibrate' pass before), MatMuls that share an input (q/k/v,
gate/up) get one input-channel scale s found by :func:`graphopt.quant.awq.awq_scale_search` and folded
into the producer of x (RMSNorm weight, or the up projection's columns for the down projection);
then each weight gets a per-block clip ratio (:func:`graphopt.quant.awq.awq_clip_search`). Inputs whose
producer cannot absorb s (attention output → o_proj) get the clip search only. The tied embedding is
rounded to nearest (RTN): scaling or clipping it for the lm_head would change the embedding lookup.
``method = "rtn"`` is plain round-to-nearest everywhere, for comparison. Lowering to MatMulNBits /
GatherBlockQuantized is 'lower-quant-ort-cpu'. Letters: B batch, S seq, K/N in/out channels, V vocab,
H hidden, b block size.

``full_range`` (ort-cpu-int4 sets it) rounds on ONNX Runtime's symmetric grid: each block's largest-magnitude
weight maps to -8 exactly (scale = that weight / -8, negative when it is positive), so 16 levels are used, a
step 7/8 of the default's amax/7 (15 levels, positive scales; the trt recipes keep that form: negative
DequantizeLinear scales are untested on TensorRT). The AWQ searches round the same way, clip ratio 1.0
being ORT's plain RTN.

Measured against ONNX Runtime's own int4 (SmolLM2-135M, ort-cpu, blocks of 32, accuracy_level 4; KL / top-1
vs the fp32 model on the built-in corpus's 2,040 evaluation tokens; size = the artifact's files, tokenizer and
model_verify.onnx included; GenAI: model.onnx + data only. model.onnx.data alone is 86,287,616 bytes for graphopt's
int4 and GenAI's alike, 103,982,336 for ORT's RTN, which stores the untied lm_head's int4 copy)::

    build                                                  KL      top-1   ppl (fp32 37.44)   size MB
    graphopt awq, 15 levels (the old default)              0.432   64.4%   52.27              91.5
    graphopt rtn, 15 levels                                0.519   57.5%   54.24              91.5
    graphopt rtn, full_range                               0.391   60.0%   45.79              91.5
    graphopt awq, full_range (the default now)             0.368   65.5%   47.34              91.5
    graphopt awq, 15 levels, int8 embedding/lm_head        0.283   71.4%   45.10             105.7
    graphopt awq, full_range, int8 embedding/lm_head       0.256   74.1%   43.74             105.7
    peer: ORT MatMulNBitsQuantizer RTN (ort-cpu-int4-ort-rtn) 0.391 60.5%  45.98             108.3
    peer: GenAI builder -p int4 (block 32, accuracy 4)     0.392   60.2%   46.03              86.5

Why AWQ lost: not the search and not the tied lm_head (GenAI 0.18 quantizes the tied embedding to int4 too,
one table shared by GatherBlockQuantized and the lm_head) but the rounding grid. amax/7 leaves level -8
unused; ONNX Runtime's scale = peak / -8 uses it, and that alone takes plain RTN from KL 0.519 to 0.391 (=
ORT's own RTN). AWQ's clip grid (1.0, 0.95, 0.9, …) does not contain 7/8, the ratio that gives ORT's step
(and would still clip the peak of one sign), and the embedding/lm_head gets no clip search at all. On the full-range grid AWQ beats both peers on KL and top-1
(its perplexity, 47.3, is a little above theirs, ~46). The int4 embedding/lm_head is still a large share of
the error: ``embedding_bits = 8`` takes the default's KL from 0.368 to 0.256 (top-1 74.1%) for +14 MB.
Measured with ``scripts/int4_peers.py`` (one trace, each recipe built as compare builds it, GenAI's cached
model through graphopt.measure.genai_peer.genai_logits); ``graphopt compare ort-cpu-int4 --model smollm2-135m``
adds both peers to its table on every int4 run (compare_peers) and reproduced the default's and both peers' rows.

Options: ``block_size`` 32 (16–256, a power of two dividing every K); ``method`` "awq" | "rtn";
``embedding`` (default true) quantizes the token embedding / tied lm_head too, with
``embedding_bits`` 4 (default) or 8 (int8 blocks: the lm_head is the most sensitive MatMul).
Mixed precision by layer name (:func:`graphopt.passes._quant_graph.layer_name`, e.g.
``model.layers.0.mlp.down_proj``; the tied embedding is ``lm_head``), exact or shell patterns:
``keep = ["lm_head", "model.layers.0.*"]`` leaves those weights fp32; ``promote = [...]`` gives them
int8 blocks of the same size (MatMulNBits 8-bit). ``graphopt build --kl-budget`` fills both.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graphopt.quant.awq import awq_clip_search, awq_scale_search, search_threads
from graphopt.core.errors import PassError
from graphopt.passes._quant_graph import (Embedding, Linear, calibration, dequantize_node, drop_unused,
                                          fold_input_scale, fold_target, weight_targets,
                                          group_by_input, kept_count, layer_name, embedding_name, matches,
                                          record_precision)
from graphopt.passes.base import GraphoptPass
from graphopt.quant.numerics import quantize_int

METHODS = ("awq", "rtn")
BLOCK_SIZES = (16, 32, 64, 128, 256)


class QuantizeInt4Pass(GraphoptPass):
    """Weight-only int4 Q/DQ (blocked, symmetric) with AWQ-style scale and clip search."""

    name = "quantize-int4"
    lossy = True

    def __init__(self, block_size: int = 32, method: str = "awq", embedding: bool = True,
                 embedding_bits: int = 4, keep: list[str] | None = None, promote: list[str] | None = None,
                 full_range: bool = False) -> None:
        super().__init__()
        self.full_range = full_range
        self.keep, self.promote = list(keep or ()), list(promote or ())
        self.block_size = block_size
        self.method = method
        self.embedding = embedding
        self.embedding_bits = embedding_bits

    def requires(self, model: ir.Model) -> None:
        if self.method not in METHODS:
            raise PassError(f"quantize-int4: method {self.method!r} is unknown; use one of {list(METHODS)}")
        if self.block_size not in BLOCK_SIZES:
            raise PassError(f"quantize-int4: block_size {self.block_size} is not one of {list(BLOCK_SIZES)} "
                            "(MatMulNBits needs a power of two ≥ 16); use --int4-block 32, 64 or 128")
        if self.embedding_bits not in (4, 8):
            raise PassError(f"quantize-int4: embedding_bits {self.embedding_bits} is not 4 or 8")
        if self.method == "awq":
            calibration(self.context, self.name)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        linears, embedding, fp32 = weight_targets(graph, self.embedding, self.keep)
        self._check_blocks(linears, embedding)
        if kept := kept_count(graph, linears, embedding, self.embedding):
            self.count("kept_fp32", kept)
        if not linears and embedding is None:
            return ir.passes.PassResult(model, False)
        scaled: dict[str, np.ndarray] = {}
        with search_threads():
            if self.method == "awq":
                scaled = self._scale_groups(graph, linears, calibration(self.context, self.name))
            for lin in linears:
                self._quantize_linear(graph, lin, model, scaled)
        if embedding is not None:
            self._quantize_embedding(graph, embedding)
        drop_unused(graph, fp32)
        bits = 8 if embedding is not None and matches(embedding_name(embedding), self.promote) else self.embedding_bits
        form = "symmetric full-range" if self.full_range else "symmetric"
        record_precision(self.context, self.stats, weights=f"int4 block {self.block_size} {form} ({self.method})",
                         embedding=f"int{bits} block {self.block_size} (rtn)" if embedding else "fp32")
        return ir.passes.PassResult(model, True)

    def _check_blocks(self, linears: list[Linear], embedding: Embedding | None) -> None:
        dims = [(lin.array.shape[0], f"MatMul {lin.node.name!r}") for lin in linears]
        if embedding is not None:
            dims.append((embedding.array.shape[1], f"the embedding {embedding.table.name!r}"))
        for dim, where in dims:
            if dim % self.block_size:
                common = math.gcd(*[d for d, _ in dims])
                fits = [b for b in (32, 64, 128) if common % b == 0]
                hint = f"use --int4-block {' or '.join(map(str, fits))}" if fits else \
                    "this model's dimensions fit no int4 block size; use --int8"
                raise PassError(f"quantize-int4: block size {self.block_size} does not divide the input dimension "
                                f"{dim} of {where}; {hint}")

    def _scale_groups(self, graph: ir.Graph, linears: list[Linear], stats) -> dict[str, np.ndarray]:
        """AWQ scale search per shared input; fold each useful scale into the input's producer."""
        scaled = {}
        for name, group in group_by_input(linears).items():
            x = stats.get(name)
            if x is None:
                self.note(f"quantize-int4: no calibration statistics for {name!r}; rounded without AWQ")
                continue
            if fold_target(group[0].node.inputs[0], group) is None:  # e.g. attention output → o_proj
                self.count("awq_unscaled_inputs")
                continue
            weights = np.concatenate([lin.array for lin in group], axis=1)
            found = awq_scale_search(x.sample, weights, x.mean_abs, self.block_size, full_range=self.full_range)
            if found.alpha == 0.0:
                self.count("awq_kept_unit_scale")
                continue
            how = fold_input_scale(graph, group[0].node.inputs[0], group, found.scale)
            scaled[name] = found.scale
            self.count(f"awq_scaled_into_{how.replace('-', '_')}")
        return scaled

    def _quantize_linear(self, graph: ir.Graph, lin: Linear, model: ir.Model, scaled: dict) -> None:
        w = lin.array
        clip = None
        if self.method == "awq":
            x = calibration(self.context, self.name).get(lin.node.inputs[0].name)
            if x is not None:
                s = scaled.get(lin.node.inputs[0].name)
                clip = awq_clip_search(x.sample if s is None else x.sample / s, w, self.block_size,
                                       full_range=self.full_range)
                self.count("awq_clipped")
        bits = 8 if matches(layer_name(lin.node), self.promote) else 4
        qz = quantize_int(w, bits, axis=0, block_size=self.block_size, clip=clip if bits == 4 else None,
                          full_range=self.full_range)
        lin.node.replace_input_with(1, dequantize_node(graph, lin.node, qz, lin.weight.name))
        self.count("matmuls" if bits == 4 else "promoted_int8")

    def _quantize_embedding(self, graph: ir.Graph, embedding: Embedding) -> None:
        bits = 8 if matches(embedding_name(embedding), self.promote) else self.embedding_bits
        qz = quantize_int(embedding.array, bits, axis=1, block_size=self.block_size, full_range=self.full_range)
        dq = dequantize_node(graph, graph.node(0), qz, embedding.table.name)  # before every reader
        embedding.table.replace_all_uses_with(dq)
        self.count("embedding")
        if embedding.lm_head is not None:
            self.count("tied_lm_head")

