"""ONNX Runtime engine: the only runtime code that touches onnxruntime.

One ``InferenceSession`` (CPU EP, all graph optimizations) on ``model.onnx``, driven through one IOBinding
whose past/present are the slot cache's own buffers, updated in place (runtime/ort_binding.py).

On ort-cpu attention is ``com.microsoft.GroupQueryAttention``, which refuses B > 1 with S > 1 when any row
already has a cache. An artifact whose manifest lists ``graphs.multi_token`` (``model_verify.onnx``: the
same contract with TensorScatter + Attention, passes/lower_verify.py) runs such steps in one call: a second
session on it, created on first need (it holds a second copy of the weights in memory), binds the same
slot buffers. Without it, :meth:`OrtEngine.prefill` runs such rows one call each.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graphopt.core.artifact_files import artifact_path
from graphopt.core.io_contract import cache_pairs
from graphopt.core.errors import ArtifactError, RuntimeInputError
from graphopt.core.manifest import Manifest, load_manifest
from graphopt.runtime.config import DEFAULT_MAX_SEQ, DEFAULT_MAX_SLOTS
from graphopt.runtime.engine_api import Capabilities, engine_path
from graphopt.runtime.graph_check import check_session_io
from graphopt.runtime.kv_cache import SlotCache
from graphopt.runtime.ort_binding import INPUT_ROLES, BoundSession

log = logging.getLogger(__name__)

ENGINE = "graphopt.runtime.engine:OrtEngine"  # how targets name this engine (graphopt/targets)


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:  # psutil is a dependency, but stay usable without it
        return os.cpu_count() or 1


def runtime_max_seq(manifest: Manifest, requested: int | None) -> int:
    """The cache length to allocate: ``requested`` (default min(2048, artifact max_seq)), ≤ the artifact's."""
    limit = manifest.dims.max_seq
    fixed = manifest.input("past_key", 0).shape[2]
    if isinstance(fixed, int):  # the graph was built for one cache length: it must be used as is
        if requested is not None and requested != fixed:
            log.info("artifact cache length is fixed at %d; ignoring max_seq=%d", fixed, requested)
        return fixed
    if requested is None:
        return min(DEFAULT_MAX_SEQ, limit)
    if not 1 <= requested <= limit:
        raise RuntimeInputError(f"max_seq={requested} is outside 1..{limit} (the artifact's max_seq); lower it")
    return requested


_global_pool_threads: int | None = None  # mirrors ORT's process-wide state: set once, never unset


def use_global_thread_pool(threads: int | None) -> int:
    """Make every later session in the process share one ORT intra-op thread pool; returns its size.

    Two sessions that take turns (a speculative draft and its target) each with their own spinning pool
    fight over the cores: measured on 2 cores (SmolLM2 fp32 target, int4 draft), the draft step took 13–16 ms
    instead of 6 and the target's 5-token verification 43–49 ms instead of 23. ORT fixes the pool size at
    the first call and from then on refuses any session created with its own threads — also those other
    code creates directly — so only a process that runs nothing but graphopt engines should call this (the
    CLI does, for --draft). Elsewhere, ``OrtEngine(spinning=False)`` avoids most of the fight.
    """
    global _global_pool_threads
    if _global_pool_threads is None:
        size = threads or physical_cores()
        ort.set_global_thread_pool_sizes(size, 1)
        _global_pool_threads = size
        log.info("ONNX Runtime sessions share one %d-thread pool from now on", size)
    return _global_pool_threads


def create_session(model_path: Path, threads: int | None, spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if _global_pool_threads is not None:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ArtifactError(f"onnxruntime cannot load {model_path}: {exc}; rebuild the artifact") from None


def cache_names(manifest: Manifest) -> list[tuple[str, str]]:
    """(past, present) name pairs, K then V per layer, checked against the manifest's aliases."""
    pairs = cache_pairs(manifest)
    for past, present in pairs:
        if manifest.aliases.get(present) != past:
            raise ArtifactError(
                f"manifest kv_cache.aliases maps {present!r} to {manifest.aliases.get(present)!r}, expected {past!r}; "
                "the runtime needs present_* to alias past_* (rebuild with 'insert-kv-cache')"
            )
    return pairs


class OrtEngine:
    """Runs an ort-cpu artifact with a slot KV cache bound in place.

    Args:
        artifact_dir: a graphopt artifact (manifest hashes are verified).
        max_slots: concurrent sequences (rows of the KV slot buffers).
        max_seq: cache positions per slot; default min(2048, the artifact's max_seq).
        threads: ORT intra-op threads; default the number of physical cores.
        spinning: let idle ORT threads spin (fastest alone; False when another session takes turns with this one).
    """

    def __init__(self, artifact_dir: str | Path, max_slots: int = DEFAULT_MAX_SLOTS, max_seq: int | None = None,
                 threads: int | None = None, spinning: bool = True) -> None:
        directory = Path(artifact_dir)
        self.manifest = load_manifest(directory)
        if engine_path(self.manifest.target) != ENGINE:
            raise ArtifactError(f"artifact {directory} targets {self.manifest.target!r}, which OrtEngine does not run; "
                                "open it with graphopt.runtime.engine_api.open_engine, or rebuild with '--target ort-cpu'")
        dims = self.manifest.dims
        self.vocab_size = dims.vocab_size
        self.eos_token_ids = dims.eos_token_ids
        self.pad_token_id = dims.pad_token_id or 0
        self.max_seq = runtime_max_seq(self.manifest, max_seq)
        self.session = create_session(directory / "model.onnx", threads, spinning)
        check_session_io(self.manifest, self.session)
        self.cache = SlotCache(dims.num_layers, dims.num_kv_heads, dims.head_dim, max_slots, self.max_seq,
                               np.dtype(self.manifest.kv_dtype))
        self._cache_names = cache_names(self.manifest)
        self._plain = BoundSession(self.session, self.manifest, self.cache, self._cache_names)
        self._binding = self._plain.binding
        multi = self.manifest.graphs.get("multi_token")
        self._multi_path = artifact_path(directory, multi, "graphs.multi_token") if multi else None
        self._multi: BoundSession | None = None
        self._session_options = (threads, spinning)

    @property
    def multi_token(self) -> bool:
        """True when several rows of several tokens over a cache run in one call (the artifact has the graph)."""
        return self._multi_path is not None

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(multi_row_multi_token=self.multi_token)

    def prepare_multi_token(self) -> bool:
        """Load the multi-token graph now if the artifact has one; False (logged) when it has none or it will
        not load, and from then on such rows run one call each."""
        if not self.multi_token:
            return False
        try:
            self.load_multi_token()
            return True
        except ArtifactError as exc:
            log.warning("%s; several multi-token rows run one call each", exc)
            return False

    def load_multi_token(self) -> BoundSession:
        """The session on the multi-token graph, created on first call (a second copy of the weights in memory)."""
        if self._multi is None:
            if self._multi_path is None:
                raise ArtifactError("this artifact has no multi-token graph (manifest graphs.multi_token); rebuild "
                                    "it with this graphopt version to batch several multi-token rows in one call")
            log.info("loading the multi-token graph %s: a second ORT session, holding its own copy of the "
                     "weights in memory", self._multi_path)
            try:
                session = create_session(self._multi_path, *self._session_options)
            except Exception as exc:  # e.g. an onnxruntime without opset-24 Attention/TensorScatter
                path, self._multi_path = self._multi_path, None  # from now on: one call per multi-token row
                raise ArtifactError(f"onnxruntime {ort.__version__} cannot load {path.name} ({exc}); upgrade "
                                    "onnxruntime (tested with 1.32) to batch several multi-token rows") from exc
            check_session_io(self.manifest, session, self._multi_path.name)
            self._multi = BoundSession(session, self.manifest, self.cache, self._cache_names)
        return self._multi

    def _bound(self, batch: int, seq: int, cache_lens: np.ndarray) -> BoundSession:
        """model.onnx, or the multi-token graph for B > 1 rows of S > 1 tokens over a cache (GQA refuses those)."""
        if batch > 1 and seq > 1 and cache_lens.any():
            return self.load_multi_token()
        return self._plain

    # ---- the contract call -------------------------------------------------------------------------------
    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, cache_lens: np.ndarray,
             input_lens: np.ndarray, logit_positions: np.ndarray, first_slot: int = 0) -> np.ndarray:
        """One graph call over slots ``first_slot..first_slot+B-1``; returns logits [B, k, V].

        The returned array is a view of the engine's output buffer, overwritten by the next call: copy it
        to keep it. Cache lengths are not advanced here (``prefill``/``decode`` do that).
        """
        batch, seq = input_ids.shape
        k = logit_positions.shape[1]
        cache_lens = np.asarray(cache_lens)
        self._check_step(batch, seq, cache_lens, first_slot)
        bound = self._bound(batch, seq, cache_lens)
        views = bound.stage(batch, seq, k)
        for role, value in zip(INPUT_ROLES, (input_ids, position_ids, cache_lens, input_lens, logit_positions)):
            np.copyto(views[role], value, casting="same_kind")
        return bound.run(first_slot, batch)

    def _check_step(self, batch: int, seq: int, cache_lens: np.ndarray, first_slot: int) -> None:
        if cache_lens.shape != (batch,):
            raise RuntimeInputError(f"cache_lens has shape {cache_lens.shape}, expected ({batch},)")
        if int(cache_lens.max()) + seq > self.max_seq:
            raise RuntimeInputError(
                f"a row would reach position {int(cache_lens.max()) + seq} (cache {int(cache_lens.max())} + {seq} "
                f"new), over the engine's max_seq {self.max_seq}; raise max_seq or send fewer tokens"
            )
        if batch > 1 and seq > 1 and cache_lens.any() and not self.multi_token:
            raise RuntimeInputError(
                f"GroupQueryAttention (ort-cpu) cannot run {batch} rows of {seq} tokens on top of a cache and "
                "the artifact has no multi-token graph; use OrtEngine.prefill, which runs such rows one call each"
            )

    # ---- helpers that keep the cache lengths -------------------------------------------------------------
    def prefill(self, chunks: Sequence[Sequence[int]], slots: Sequence[int]) -> np.ndarray:
        """Append ``chunks[i]`` to the cache of ``slots[i]``; return each chunk's last-token logits [B, V].

        One batched call over a contiguous slot range when GQA allows it (every row's cache is empty, or one
        token per row) or the multi-token graph does: when its session is loaded already (speculation loads
        it; plain serving never pays its copy of the weights for prefill), padding to the longest chunk at
        most doubles the tokens and every row has room for it. Otherwise one call per row. The result is a
        fresh array.
        """
        if len(chunks) != len(slots) or not chunks:
            raise RuntimeInputError(f"prefill got {len(chunks)} chunks for {len(slots)} slots; pass one per slot")
        for slot, chunk in zip(slots, chunks):
            if len(chunk) == 0:
                raise RuntimeInputError(f"prefill chunk for slot {slot} is empty; pass at least one token")
            self.cache.check_active(slot)
            self.cache.check_room(slot, len(chunk))
        first = int(slots[0])
        contiguous = list(slots) == list(range(first, first + len(slots)))
        seq = max(len(chunk) for chunk in chunks)
        lens = self.cache.lens[list(slots)]
        padded_ok = self._multi is not None and len(chunks) * seq <= 2 * sum(map(len, chunks)) and \
            int(lens.max()) + seq <= self.max_seq
        if contiguous and (seq == 1 or padded_ok or not lens.any()):
            logits = self._prefill_rows(chunks, first).copy()
        else:
            # each call overwrites the output buffer: copy every row out before the next
            logits = np.stack([self._prefill_rows([chunk], int(slot))[0].copy() for chunk, slot in zip(chunks, slots)])
        for slot, chunk in zip(slots, chunks):
            self.cache.advance(int(slot), len(chunk))
        return logits

    def _prefill_rows(self, chunks: Sequence[Sequence[int]], first_slot: int) -> np.ndarray:
        """One call for contiguous slots, chunks right-padded; logits [B, V] (a view)."""
        batch, seq = len(chunks), max(len(chunk) for chunk in chunks)
        lens = self.cache.lens[first_slot:first_slot + batch]
        bound = self._bound(batch, seq, lens)
        views = bound.stage(batch, seq, 1)
        views["input_ids"].fill(self.pad_token_id)
        views["position_ids"].fill(0)
        for row, chunk in enumerate(chunks):
            views["input_ids"][row, : len(chunk)] = chunk
            views["position_ids"][row, : len(chunk)] = np.arange(lens[row], lens[row] + len(chunk))
            views["input_lens"][row] = len(chunk)
            views["logit_positions"][row, 0] = len(chunk) - 1
        views["cache_lens"][:] = lens
        return bound.run(first_slot, batch)[:, 0]

    def decode(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """One token for each of slots ``0..B-1`` (B = len(token_ids)); returns logits [B, V] (a view).

        The view is overwritten by the next engine call.
        """
        batch = len(token_ids)
        if not 1 <= batch <= self.cache.num_active:
            raise RuntimeInputError(f"decode got {batch} tokens for {self.cache.num_active} active slots")
        lens = self.cache.lens[:batch]
        if int(lens.max()) + 1 > self.max_seq:
            raise RuntimeInputError(f"a slot is full ({self.max_seq} tokens = max_seq); finish it or raise max_seq")
        views = self._plain.stage(batch, 1, 1)
        views["input_ids"][:, 0] = token_ids
        views["position_ids"][:, 0] = lens
        views["cache_lens"][:] = lens
        views["input_lens"].fill(1)
        views["logit_positions"].fill(0)
        logits = self._plain.run(0, batch)
        self.cache.advance_prefix(batch)
        return logits[:, 0]
