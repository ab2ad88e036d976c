"""The pass registry: stable kebab-case names → pass classes (one module each)."""

from __future__ import annotations

import inspect

from graphopt.passes.base import GraphoptPass
from graphopt.passes.calibrate import CalibratePass
from graphopt.passes.canonicalize_linear import CanonicalizeLinearPass
from graphopt.passes.check_trt import CheckTrtPass
from graphopt.passes.cleanup import CleanupPass
from graphopt.passes.fuse_attention import FuseAttentionPass
from graphopt.passes.fuse_qkv_rope import FuseQkvRopePass
from graphopt.passes.insert_kv_cache import InsertKVCachePass
from graphopt.passes.keep_logits import KeepLogitsPass
from graphopt.passes.keep_quant import KeepQuantPass
from graphopt.passes.lower_ort_cpu import LowerOrtCpuPass
from graphopt.passes.lower_quant_ort_cpu import LowerQuantOrtCpuPass
from graphopt.passes.lower_trt import LowerTrtPass
from graphopt.passes.lower_verify import LowerVerifyPass
from graphopt.passes.quantize_fp8 import QuantizeFp8Pass
from graphopt.passes.quantize_int4 import QuantizeInt4Pass
from graphopt.passes.quantize_int4_ort import QuantizeInt4OrtPass
from graphopt.passes.quantize_int8 import QuantizeInt8Pass
from graphopt.passes.quantize_kv_cache import QuantizeKVCachePass

REGISTRY: dict[str, type[GraphoptPass]] = {
    cls.name: cls
    for cls in (CleanupPass, CanonicalizeLinearPass, FuseAttentionPass, InsertKVCachePass, KeepLogitsPass, LowerOrtCpuPass)
}
REGISTRY |= {  # quantization: calibrate → quantize-* (Q/DQ) → lower-quant-<target>
    cls.name: cls
    for cls in (CalibratePass, QuantizeInt4Pass, QuantizeInt4OrtPass, QuantizeInt8Pass, QuantizeFp8Pass,
                QuantizeKVCachePass, KeepQuantPass, LowerQuantOrtCpuPass, FuseQkvRopePass)
}
REGISTRY |= {cls.name: cls for cls in (LowerTrtPass, CheckTrtPass)}  # --target trt: lower, then hold to the parser
REGISTRY[LowerVerifyPass.name] = LowerVerifyPass  # ort-cpu: the multi-token graph (the build writes it on its own)


def pass_options(cls: type[GraphoptPass]) -> dict[str, tuple[type, object]]:
    """Option name → (type, default) from the pass constructor's typed keyword arguments."""
    params = inspect.signature(cls.__init__).parameters.values()
    hints = inspect.get_annotations(cls.__init__, eval_str=True)
    return {p.name: (hints.get(p.name, object), p.default) for p in params if p.name != "self"}


def summary(cls: type[GraphoptPass]) -> str:
    return (inspect.getdoc(cls) or "").splitlines()[0]
