"""The pass registry: stable kebab-case names → pass classes (one module each)."""

from __future__ import annotations

import inspect

from graphopt.passes.base import GraphoptPass
from graphopt.passes.cleanup import CleanupPass
from graphopt.passes.fuse_attention import FuseAttentionPass
from graphopt.passes.insert_kv_cache import InsertKVCachePass
from graphopt.passes.keep_logits import KeepLogitsPass
from graphopt.passes.lower_ort_cpu import LowerOrtCpuPass

REGISTRY: dict[str, type[GraphoptPass]] = {
    cls.name: cls
    for cls in (CleanupPass, FuseAttentionPass, InsertKVCachePass, KeepLogitsPass, LowerOrtCpuPass)
}


def pass_options(cls: type[GraphoptPass]) -> dict[str, tuple[type, object]]:
    """Option name → (type, default) from the pass constructor's typed keyword arguments."""
    params = inspect.signature(cls.__init__).parameters.values()
    hints = inspect.get_annotations(cls.__init__, eval_str=True)
    return {p.name: (hints.get(p.name, object), p.default) for p in params if p.name != "self"}


def summary(cls: type[GraphoptPass]) -> str:
    return (inspect.getdoc(cls) or "").splitlines()[0]
