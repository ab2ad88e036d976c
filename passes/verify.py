"""--verify: check the graph after every pass.

Structural: the onnx checker and onnx shape inference on the serialized model. Numeric: the
logits of a fixed batch (2 rows × 6 tokens, empty cache, all positions requested) on ONNX
Runtime, compared with the previous stage's (within TOLERANCE, except after a pass that declares
itself lossy: its change is recorded and the next pass is compared with the quantized stage).
``graphopt::FlashAttention`` runs through its standard-op reference expansion, so the canonical
graph is checked as well as the lowered one.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.core.errors import PassError
from graphopt.plugins.reference_run import empty_cache_feeds, reference_session

BATCH, SEQ, CAPACITY = 2, 6, 8
TOLERANCE = 1e-4
ORT_ONNX_DOMAIN_CONTRIB = ("SimplifiedLayerNormalization",)


class StageChecker:
    """Holds the previous stage's logits; the traced graph is first checked against torch when given."""

    def __init__(self, model: ir.Model, torch_model=None) -> None:
        self.seed_ids = np.random.default_rng(0).integers(0, _vocab(model), size=(BATCH, SEQ))
        self.reference = run_stage(model, self.seed_ids)
        if torch_model is not None:
            expected = torch_logits(torch_model, self.seed_ids)
            diff = float(np.max(np.abs(expected - self.reference)))
            if not diff <= TOLERANCE:
                raise PassError(f"--verify: the traced graph's logits differ from PyTorch's by {diff:.3g} "
                                f"(limit {TOLERANCE}); the export is wrong for this model — report it")
            self.trace_diff = diff

    def check(self, model: ir.Model, name: str, before: list[str], lossy: bool = False) -> float:
        """Max |Δlogits| against the previous stage. A lossy pass (quantization) is not held to
        TOLERANCE: its change is returned for the report and becomes the next stage's reference."""
        logits = run_stage(model, self.seed_ids, where=f"after pass {name!r} (passes before: {before})")
        diff = float(np.max(np.abs(logits - self.reference)))
        if not np.isfinite(diff):
            raise PassError(f"--verify: after pass {name!r} the logits are not finite; passes before: {before}; "
                            "drop or fix that pass")
        if not lossy and not diff <= TOLERANCE:
            raise PassError(f"--verify: after pass {name!r} logits differ from the previous stage by {diff:.3g} "
                            f"(limit {TOLERANCE}); passes before: {before}; drop or fix that pass")
        self.reference = logits
        return diff


def torch_logits(torch_model, input_ids: np.ndarray) -> np.ndarray:
    import torch

    ids = torch.from_numpy(input_ids.astype(np.int64))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return torch_model(input_ids=ids, position_ids=positions, use_cache=False).logits.numpy()


def run_stage(model: ir.Model, input_ids: np.ndarray, where: str = "traced graph") -> np.ndarray:
    proto = ir.to_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        if any(f"for {op} with domain" in str(exc) for op in ORT_ONNX_DOMAIN_CONTRIB):
            pass  # ONNX Runtime registers these in the default domain; the checker does not know them
        else:
            raise PassError(f"--verify: {where}: the graph is invalid: {str(exc).splitlines()[0]}") from None
    session = reference_session(model)
    names = [o.name for o in session.get_outputs()]
    return session.run(["logits" if "logits" in names else names[0]],
                       empty_cache_feeds(session, input_ids, CAPACITY))[0]


def _vocab(model: ir.Model) -> int:
    out = next(v for v in model.graph.outputs if v.name == "logits")
    dim = out.shape[-1] if out.shape is not None else None
    return dim if isinstance(dim, int) else 2
