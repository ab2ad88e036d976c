"""lower-verify: the multi-token graph (model_verify.onnx) matches model.onnx's GroupQueryAttention run one row
per call, on ragged multi-row multi-token steps over existing caches: logits and cache contents."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.build.artifact import BuildOptions, build
from graphopt.core.errors import PassError
from graphopt.core.io_contract import io_specs
from graphopt.passes.lower_verify import LowerVerifyPass
from graphopt.passes.pipeline import PassSpec, load_recipe
from graphopt.core.progress import QUIET
from graphopt.runtime.engine import OrtEngine
from tiny_models import VOCAB, make_tiny_model

ATOL = 1e-4
PROMPT_LENS = (3, 11, 0, 17)  # slot 2 has an empty cache; the others already hold tokens
CHUNK_LENS = (5, 1, 3, 2)  # ragged: padded to 5 in the batched call


@functools.lru_cache(maxsize=None)
def artifact(arch: str, packed: bool = False, **overrides) -> Path:
    """A tiny ort-cpu artifact; ``packed`` adds 'fuse-qkv-rope' (packed QKV, RoPE inside GQA)."""
    root = Path(tempfile.mkdtemp(prefix="graphopt-verify-"))
    recipe = load_recipe("ort-cpu")
    if packed:
        passes = (*recipe.passes[:-1], PassSpec("fuse-qkv-rope", {}), recipe.passes[-1])
        recipe = recipe.__class__("ort-cpu+fuse", recipe.target, passes)
    hf = make_tiny_model(arch, root / "hf", **overrides)
    build(str(hf), BuildOptions(recipe, root / "artifact"), QUIET)
    return root / "artifact"


def _filled(path: Path, prompts: list[list[int]]) -> OrtEngine:
    engine = OrtEngine(path, max_slots=4, max_seq=64, threads=1)
    for prompt in prompts:
        slot = engine.cache.allocate()
        if prompt:
            engine.prefill([prompt], [slot])
    return engine


CASES = {"llama": ("llama", False, {}), "llama-packed-rope": ("llama", True, {}),
         "mistral-window": ("mistral", False, {"sliding_window": 4})}


@pytest.mark.parametrize("case", list(CASES))
def test_multi_token_graph_matches_per_row_gqa(case: str) -> None:
    arch, packed, overrides = CASES[case]
    path = artifact(arch, packed, **overrides)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, VOCAB, size=n).tolist() for n in PROMPT_LENS]
    chunks = [rng.integers(4, VOCAB, size=n).tolist() for n in CHUNK_LENS]
    batched, per_row = _filled(path, prompts), _filled(path, prompts)
    assert batched.multi_token
    assert io_specs(ir.load(path / "model_verify.onnx")) == io_specs(ir.load(path / "model.onnx"))  # one contract
    lens, seq = batched.cache.lens[:4].copy(), max(CHUNK_LENS)
    ids = np.zeros((4, seq), np.int64)
    for row, chunk in enumerate(chunks):
        ids[row, :len(chunk)] = chunk
    counts = np.array(CHUNK_LENS, np.int32)
    got = batched.step(ids, lens[:, None] + np.arange(seq), lens, counts,
                       np.minimum(np.arange(seq)[None], counts[:, None] - 1)).copy()
    for row, chunk in enumerate(chunks):
        n, start = len(chunk), int(lens[row])
        want = per_row.step(np.array([chunk]), np.arange(start, start + n)[None], lens[row:row + 1],
                            counts[row:row + 1], np.arange(n)[None], first_slot=row)[0]
        np.testing.assert_allclose(got[row, :n], want, atol=ATOL, err_msg=f"{case} row {row} logits")
        for ours, theirs in zip(batched.cache.keys + batched.cache.values, per_row.cache.keys + per_row.cache.values):
            np.testing.assert_allclose(ours[row, :, :start + n], theirs[row, :, :start + n], atol=ATOL,
                                       err_msg=f"{case} row {row} cache")


def test_prefill_batches_ragged_rows_over_a_cache() -> None:
    """Once the multi-token session is loaded, OrtEngine.prefill runs ragged chunks over caches in one call on
    it; the same logits as one call per row (what an engine that has not loaded it does)."""
    path = artifact("mistral", False, sliding_window=4)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(4, VOCAB, size=n).tolist() for n in (6, 9, 4)]
    chunks = [rng.integers(4, VOCAB, size=n).tolist() for n in (4, 3, 2)]
    batched, per_row = _filled(path, prompts), _filled(path, prompts)
    multi = batched.load_multi_token()
    runs = []
    multi.session.run_with_iobinding = lambda binding, _run=multi.session.run_with_iobinding: runs.append(1) or \
        _run(binding)
    got = batched.prefill(chunks, [0, 1, 2])
    want = np.stack([per_row.prefill([chunk], [slot])[0] for slot, chunk in enumerate(chunks)])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert runs == [1]  # all three rows in one call on the multi-token graph
    assert batched.cache.cache_lens().tolist() == per_row.cache.cache_lens().tolist() == [10, 12, 6]


def test_pass_counts_and_leaves_graphs_without_gqa_alone() -> None:
    model = ir.load(artifact("llama", True) / "model.onnx")
    lowering = LowerVerifyPass()
    assert lowering(model).modified
    assert lowering.stats == {"masks": 1, "packed_qkv_split": 2, "rope_unfused": 4, "standard_attention": 2}
    assert not any(n.op_type == "GroupQueryAttention" for n in model.graph)
    again = LowerVerifyPass()
    assert again(model).modified is False and again.stats == {}


def test_unsupported_attributes_are_refused_with_a_fix() -> None:
    model = ir.load(artifact("llama") / "model.onnx")
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    gqa.attributes["smooth_softmax"] = ir.AttrInt64("smooth_softmax", 1)
    with pytest.raises(PassError, match="smooth_softmax.*one call each"):
        LowerVerifyPass()(model)
