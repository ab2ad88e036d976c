"""How mixture-of-experts blocks are traced: two exportable forms of transformers' experts forward.

transformers' default experts kernel (grouped GEMM over tokens sorted by expert) has no ONNX form.
Two forms that export with standard ops and compute the same function:

- ``routed`` (transformers' ``batched_mm``): per token, Gather the k chosen experts' matrices and
  run batched MatMuls over them; a decode step reads k experts but copies them first::

      x [T,H] ─repeat k─► [T·k,1,H] ─MatMul─ Gather(W_gate_up, ids) [T·k,H,2I] ─gate─ MatMul Gather(W_down, ids)
          ─► [T·k,H] ·weights ─Reshape [T,k,H]─ReduceSum─► y

- ``dense``: every expert on every token, mixed by the router's top-k weights scattered to [T,E]
  (zero for experts not chosen); reads all E experts once per step, copies nothing::

      x [1,T,H] ─MatMul W_gate_up [E,H,2I]─gate─MatMul W_down [E,I,H]─► [E,T,H] ─einsum(routing [T,E])─► y

Measured by scripts/bench_moe.py (Mixtral-shaped, hidden 512, 8 experts of width 1024, top-2, 4
layers, against a Llama of MLP width 2048; ms per decode step, 5 interleaved rounds on 2 shared cores):
batch 1 — routed 1.85x the dense model, dense 3.97x; batch 8 — routed 8.5x, dense 5.4x. ``routed``
is the default (single-stream decode); ``dense`` serves batches better. Neither reaches the dense
model's cost: both copy or over-read weights that ONNX Runtime's fused ``MoE`` kernel would not.
"""

from __future__ import annotations

import torch

from graphopt.core.errors import TraceError

FORMS = ("routed", "dense")
_DENSE_KEY = "graphopt_dense"


def use_form(model: torch.nn.Module, form: str) -> str | None:
    """Switch ``model``'s experts to an exportable ``form``; the form used, or None for a model without MoE."""
    if form not in FORMS:
        raise TraceError(f"experts form {form!r} is unknown; use one of {list(FORMS)}")
    can_set = getattr(model, "_can_set_experts_implementation", None)
    if can_set is None or not can_set() or getattr(model.config, "_experts_implementation", None) is None:
        return None
    if form == "dense":
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(_DENSE_KEY, dense_experts_forward)
    model.set_experts_implementation(_DENSE_KEY if form == "dense" else "batched_mm")
    return form


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward signature, computed densely (see the module docstring)."""
    routing = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=hidden_states.dtype)
    routing = routing.scatter(1, top_k_index, top_k_weights.to(hidden_states.dtype))  # [T, E]
    first = self.gate_up_proj if self.has_gate else self.up_proj
    out = torch.matmul(hidden_states.unsqueeze(0), first if self.is_transposed else first.transpose(1, 2))
    if self.has_bias:
        out = out + (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias).unsqueeze(1)
    out = self._apply_gate(out) if self.has_gate else self.act_fn(out)  # [E, T, I]
    out = torch.matmul(out, self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2))
    if self.has_bias:
        out = out + self.down_proj_bias.unsqueeze(1)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    return torch.einsum("te,eth->th", routing, out).to(hidden_states.dtype)
