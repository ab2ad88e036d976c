"""One ONNX Runtime session driven through one IOBinding over the engine's slot cache.

    inputs   input_ids, position_ids [B, S], cache_lens, input_lens [B], logit_positions [B, k]
             bound by pointer to preallocated staging buffers (filled in place each step)
    past_* / present_*   bound to the SAME memory: the slot cache's contiguous view of slots
             [first, first+B) ([B, Hkv, max_seq, D]); ORT writes new K/V there, nothing is copied back
    logits   bound to a preallocated float buffer [B, k, V], grown when a step needs more

Bindings are redone only when the step's shape (B, S, k) or slot range changes, so a steady batched decode
step costs one ``run_with_iobinding`` plus a few small numpy copies. An engine may hold two of these over one
cache: the artifact's ``model.onnx`` and its multi-token graph (``model_verify.onnx``); both bind the same
slot buffers, so either one continues what the other wrote.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from graphopt.core.io_contract import INPUT_ROLES
from graphopt.core.manifest import Manifest
from graphopt.runtime.kv_cache import SlotCache



class BoundSession:
    """``session`` with its staging buffers, logits buffer and IOBinding onto ``cache``."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest, cache: SlotCache,
                 cache_names: list[tuple[str, str]]) -> None:
        self.session = session
        self.cache = cache
        self.vocab_size = manifest.dims.vocab_size
        self._cache_names = cache_names
        self._names = {role: manifest.input(role).name for role in INPUT_ROLES}
        self._logits_name = manifest.output("logits").name
        capacity = cache.max_slots * cache.max_seq
        self._staging = {role: np.zeros(capacity, np.dtype(manifest.input(role).dtype)) for role in INPUT_ROLES}
        self._logits = np.empty(cache.max_slots * self.vocab_size, np.dtype(manifest.output("logits").dtype))
        self.binding = session.io_binding()
        self._bound_shape: tuple[int, int, int] | None = None
        self._bound_slots: tuple[int, int] | None = None
        self._views: dict[str, np.ndarray] = {}
        self._logits_view = self._logits[:0]

    def stage(self, batch: int, seq: int, k: int) -> dict[str, np.ndarray]:
        """Views of the staging buffers shaped for this step; (re)bind them only when the shape changes."""
        if self._bound_shape == (batch, seq, k):
            return self._views
        shapes = {"input_ids": (batch, seq), "position_ids": (batch, seq), "cache_lens": (batch,),
                  "input_lens": (batch,), "logit_positions": (batch, k)}
        for role, shape in shapes.items():
            buf = self._staging[role]
            self._views[role] = buf[: int(np.prod(shape))].reshape(shape)
            self.binding.bind_input(self._names[role], "cpu", 0, buf.dtype, shape, buf.ctypes.data)
        need = batch * k * self.vocab_size
        if need > self._logits.size:
            self._logits = np.empty(need, self._logits.dtype)
        shape = (batch, k, self.vocab_size)
        self._logits_view = self._logits[:need].reshape(shape)
        self.binding.bind_output(self._logits_name, "cpu", 0, self._logits.dtype, shape, self._logits.ctypes.data)
        self._bound_shape = (batch, seq, k)
        return self._views

    def run(self, first_slot: int, batch: int) -> np.ndarray:
        """Run on slots ``first_slot..first_slot+batch-1`` (after :meth:`stage`); logits [B, k, V] (a view)."""
        if self._bound_slots != (first_slot, batch):
            views = self.cache.views(first_slot, batch)
            flat = [view for pair in views for view in pair]  # K, V per layer: the order of cache_names
            for (past, present), view in zip(self._cache_names, flat):
                self.binding.bind_input(past, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
                self.binding.bind_output(present, "cpu", 0, view.dtype, view.shape, view.ctypes.data)
            self._bound_slots = (first_slot, batch)
        self.session.run_with_iobinding(self.binding)
        return self._logits_view
