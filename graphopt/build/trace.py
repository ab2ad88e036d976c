"""Trace a Hugging Face causal LM's plain forward into an onnx-ir model.

``torch.onnx.export(dynamo=True)`` at opset 23 of ``forward(input_ids, position_ids)`` with no
cache: attention comes out as the opset-23 ``Attention`` op (or decomposed for eager
attention), with ``RMSNormalization`` and ``RotaryEmbedding``. ``position_ids`` is an input so RoPE
works for batch > 1 on ORT and so the cached graph gets absolute positions. Weights stay as
references to the torch tensors until the artifact is saved (external data, memory-mapped later).
"""

from __future__ import annotations

import logging
import re
import warnings

import onnx_ir as ir
import torch

from graphopt.core.errors import TraceError
from graphopt.build.experts import use_form
from graphopt.build.features import MOE_KEY

log = logging.getLogger(__name__)
OPSET = 23


class _PlainForward(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def trace(model: torch.nn.Module, opset: int = OPSET, experts: str = "routed") -> ir.Model:
    """Export ``model`` (eval, fp32) to an ``ir.Model`` with inputs input_ids/position_ids, output logits;
    mixture-of-experts blocks in the ``experts`` form of graphopt/build/experts.py."""
    model.eval()
    moe = use_form(model, experts)
    frozen = _freeze_dynamic_rope(model)
    seq = 7
    input_ids = torch.zeros((2, seq), dtype=torch.long)
    position_ids = torch.arange(seq).expand(2, seq).contiguous()
    dims = {0: "batch", 1: "seq"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _PlainForward(model), (input_ids, position_ids), dynamo=True, opset_version=opset,
                input_names=["input_ids", "position_ids"], output_names=["logits"],
                dynamic_shapes={"input_ids": dims, "position_ids": dims}, optimize=True, verbose=False,
            )
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # the exporter colours its messages
        first = text.splitlines()[0] if text else type(exc).__name__
        raise TraceError(f"torch.onnx.export failed for {type(model).__name__}: {first}; "
                         "try --attn-implementation eager or report the model") from exc
    finally:
        _thaw(frozen)
    traced = program.model
    if frozen:
        traced.metadata_props["graphopt.rope"] = "dynamic NTK frozen at the model's context length"
    _record_config(traced, model.config)
    if moe:
        traced.metadata_props[MOE_KEY] = moe
    return traced


def _freeze_dynamic_rope(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """Dynamic NTK RoPE recomputes its frequencies when a sequence outgrows the cached length (Python
    control flow on a tensor, which torch.export refuses). Up to max_position_embeddings — the longest
    sequence the artifact runs — the frequencies are the initial ones, so the export treats the rotary
    module as static: exact for every length the artifact accepts. Returns what to restore."""
    frozen = []
    for module in model.modules():
        kind = getattr(module, "rope_type", None)
        if isinstance(kind, str) and "dynamic" in kind and hasattr(module, "inv_freq"):
            frozen.append((module, kind))
            module.rope_type = "default"
    return frozen


def _thaw(frozen: list[tuple[torch.nn.Module, object]]) -> None:
    for module, kind in frozen:
        module.rope_type = kind


def _record_config(model: ir.Model, config) -> None:
    """Facts the passes need that the graph cannot show (e.g. the sliding window)."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        model.metadata_props["graphopt.sliding_window"] = str(int(window))
    model.metadata_props["graphopt.model_type"] = str(config.model_type)

