"""TensorRT engine: a trt artifact's engine.plan behind the same protocol as OrtEngine (step, prefill, decode,
``cache``), so the scheduler and speculative decoding run on it unchanged.

    inputs   input_ids, position_ids [B, S], cache_lens, input_lens [B], logit_positions [B, k]
             copied into CUDA staging tensors each step
    past_* / present_*   bound to the SAME device address: the slot cache's contiguous view of slots
             [first, first+B) ([B, Hkv, T, D], T = the artifact's static cache length); TensorRT's KV
             update writes there in place (manifest kv_cache.aliases)
    logits   a CUDA float32 tensor [B, k, V], copied to the host after the call
    profile  "decode" when the call fits it (few tokens per row), else "prefill" (manifest profiles)

Standard attention (TensorScatter + Attention) takes ragged multi-token batches, so unlike ort-cpu no
call is split per row. Needs `tensorrt`, a CUDA torch and a GPU; importing this module needs none.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graphopt.core.errors import ArtifactError, RuntimeInputError
from graphopt.core.io_contract import INPUT_ROLES, cache_pairs
from graphopt.core.manifest import load_manifest
from graphopt.runtime.config import DEFAULT_MAX_SLOTS
from graphopt.runtime.engine_api import Capabilities
from graphopt.runtime.kv_cache import SlotCache



class DeviceSlotCache(SlotCache):
    """SlotCache whose K/V buffers are CUDA tensors (the same slot logic; slicing works the same way)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_slots: int, max_seq: int, dtype) -> None:
        import torch

        super().__init__(num_layers, kv_heads, head_dim, max_slots, 1, np.float16)  # bookkeeping only
        shape = (max_slots, kv_heads, max_seq, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device="cuda") for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device="cuda") for _ in range(num_layers)]
        self.max_seq = max_seq


class TrtEngine:
    """Runs a trt artifact's engine.plan with a slot KV cache bound in place (see the module docstring)."""

    capabilities = Capabilities(multi_row_multi_token=True, device="cuda")  # Attention takes any rows of any tokens

    def __init__(self, artifact_dir: str | Path, max_slots: int = DEFAULT_MAX_SLOTS, max_seq: int | None = None,
                 threads: int | None = None, spinning: bool = True) -> None:
        """``max_seq`` must be None or the engine's static cache capacity; ``threads``/``spinning`` are
        OrtEngine's CPU settings and mean nothing here."""
        import torch

        from graphopt.targets.trt_aot import check_plan_version, check_plugins, full_tensorrt

        directory = Path(artifact_dir)
        self.manifest = load_manifest(directory)
        if self.manifest.target != "trt":
            raise ArtifactError(f"artifact {directory} targets {self.manifest.target!r}; TrtEngine runs --target trt")
        trt = full_tensorrt()
        if trt is None:
            raise ArtifactError("TrtEngine needs the `tensorrt` package and a CUDA GPU; use OrtEngine on this machine")
        check_plan_version((self.manifest.trt or {}).get("engine"), trt.__version__)
        if self.manifest.plugins:
            importlib.import_module("graphopt.plugins.flash_attention_trt")
            check_plugins(list(self.manifest.plugins), trt.get_plugin_registry())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine((directory / "engine.plan").read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        dims = self.manifest.dims
        self.vocab_size, self.eos_token_ids, self.pad_token_id = dims.vocab_size, dims.eos_token_ids, dims.pad_token_id or 0
        self.max_seq = int((self.manifest.trt or {})["cache_capacity"])
        if max_seq is not None and max_seq != self.max_seq:
            raise ArtifactError(f"max_seq={max_seq}: this trt artifact's cache capacity is fixed at {self.max_seq}; "
                                "drop max_seq or rebuild with --trt-max-seq")
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[self.manifest.kv_dtype]
        self.cache = DeviceSlotCache(dims.num_layers, dims.num_kv_heads, dims.head_dim, max_slots, self.max_seq, dtype)
        self._names = {role: self.manifest.input(role).name for role in INPUT_ROLES}
        self._pairs = cache_pairs(self.manifest)
        self._profiles = list(self.manifest.optimization_profiles)
        self._profile: int | None = None

    def prepare_multi_token(self) -> bool:
        return True

    def _choose_profile(self, batch: int, seq: int, k: int) -> int:
        for index in sorted(range(len(self._profiles)), key=lambda i: self._profiles[i]["name"] != "decode"):
            dims = self._profiles[index]["dims"]
            if batch <= dims["batch"][2] and seq <= dims["seq"][2] and k <= dims["num_logits"][2]:
                return index
        raise RuntimeInputError(f"a call of {batch} rows × {seq} tokens × {k} logits fits no optimization profile "
                                "of the engine; send fewer rows/tokens or rebuild with larger profiles")

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache_lens: np.ndarray,
             input_lens: np.ndarray, logit_positions: np.ndarray, first_slot: int = 0) -> np.ndarray:
        """One engine call over slots ``first_slot..first_slot+B-1``; returns logits [B, k, V] (host copy)."""
        import torch

        batch, seq = input_ids.shape
        k = logit_positions.shape[1]
        if int(np.max(cache_lens)) + seq > self.max_seq:
            raise RuntimeInputError(f"a row would pass the engine's cache length {self.max_seq}; send fewer tokens")
        profile = self._choose_profile(batch, seq, k)
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._profile = profile
        values = dict(zip(INPUT_ROLES, (input_ids, position_ids, cache_lens, input_lens, logit_positions)))
        staged = {role: torch.from_numpy(np.ascontiguousarray(v)).to("cuda") for role, v in values.items()}
        logits = torch.empty((batch, k, self.vocab_size), dtype=torch.float32, device="cuda")
        for role, tensor in staged.items():
            self._bind(self._names[role], tensor, is_input=True)
        views = self.cache.views(first_slot, batch)
        for (past, present), view in zip(self._pairs, [v for pair in views for v in pair]):
            self._bind(past, view, is_input=True)
            self._bind(present, view, is_input=False)
        self._bind(self.manifest.output("logits").name, logits, is_input=False)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeInputError("TensorRT failed to run the step (see its log); check the input shapes")
        self.stream.synchronize()
        return logits.cpu().numpy()

    def _bind(self, name: str, tensor, is_input: bool) -> None:
        if is_input and name in {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}:
            self.context.set_input_shape(name, tuple(tensor.shape))
        self.context.set_tensor_address(name, tensor.data_ptr())

    def prefill(self, chunks: Sequence[Sequence[int]], slots: Sequence[int]) -> np.ndarray:
        """Append ``chunks[i]`` to slot ``slots[i]`` (one call when the slots are contiguous); last-token logits."""
        first = int(slots[0])
        if list(slots) != list(range(first, first + len(slots))):
            return np.stack([self.prefill([chunk], [slot])[0] for chunk, slot in zip(chunks, slots)])
        seq = max(len(chunk) for chunk in chunks)
        lens = self.cache.lens[first:first + len(chunks)].copy()
        ids = np.full((len(chunks), seq), self.pad_token_id, np.int64)
        for row, chunk in enumerate(chunks):
            ids[row, :len(chunk)] = chunk
        positions = lens[:, None].astype(np.int64) + np.arange(seq)
        valid = np.array([len(c) for c in chunks], np.int32)
        logits = self.step(ids, positions, lens, valid, (valid - 1)[:, None].astype(np.int64), first)[:, 0]
        for slot, chunk in zip(slots, chunks):
            self.cache.advance(int(slot), len(chunk))
        return logits

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """One token for each of slots ``0..B-1``; returns logits [B, V]."""
        batch = len(token_ids)
        lens = self.cache.lens[:batch].copy()
        ids = np.asarray(token_ids, np.int64)[:, None]
        logits = self.step(ids, lens[:, None].astype(np.int64), lens, np.ones(batch, np.int32),
                           np.zeros((batch, 1), np.int64))[:, 0]
        self.cache.advance_prefix(batch)
        return logits
