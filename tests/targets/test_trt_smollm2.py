"""The real model on --target trt: SmolLM2-135M built for trt (fp16, cache 256); on ONNX Runtime CPU, over a
ragged batched prefill and decode steps, its top-1 agrees with the fp32 model (= the canonical graph within
1e-4, test_smollm2) on ≥ 99% of positions; TensorRT-RTX parses it and AOT-builds it for SM89 and SM120."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from graphopt.build.artifact import BuildOptions
from graphopt.passes.pipeline import load_recipe
from graphopt.targets.trt_options import TrtOptions, apply_trt_options
from trt_helpers import run_steps, session
from smollm2_trace import build_smollm2, smollm2_traced

pytestmark = pytest.mark.slow
CAPACITY = 256
TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, museums such as the Louvre, and its "
        "cafes. Many visitors come every year to walk along the Seine and")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-trt") / "trt"
    build_smollm2(BuildOptions(apply_trt_options(load_recipe("trt"), TrtOptions(max_seq=CAPACITY)), out))
    return out, smollm2_traced()  # the shared trace (tests/smollm2_trace.py)


def test_top1_agrees_with_fp32(smollm2) -> None:
    import torch

    artifact, loaded = smollm2
    ids = loaded.tokenizer(TEXT)["input_ids"]
    prompts, decode_steps = [ids[:24], ids[:17]], 8
    decode = [[ids[24 + i], ids[17 + i]] for i in range(decode_steps)]
    got = run_steps(session(artifact), prompts, decode, CAPACITY)
    agree = total = 0
    for row, prompt in enumerate(prompts):
        full = prompt + [step[row] for step in decode]
        with torch.no_grad():
            expected = loaded.torch_model(input_ids=torch.tensor([full]), use_cache=False).logits[0].numpy()
        trt_rows = np.concatenate([got[0][row, :len(prompt)]] + [g[row, :1] for g in got[1:]])
        agree += int(np.sum(expected[:len(full)].argmax(-1) == trt_rows.argmax(-1)))
        total += len(full)
    print(f"SmolLM2 trt fp16 vs fp32 top-1: {agree}/{total}")
    assert agree / total >= 0.99, f"top-1 agreement {agree}/{total}"


def test_aot_builds_for_sm89_and_sm120(smollm2) -> None:
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install 'graphopt[trt]')")
    from graphopt.targets.trt_aot import aot_check

    artifact, _ = smollm2
    start = time.perf_counter()
    results = aot_check(artifact, ["sm89", "sm120"])
    print(f"SmolLM2 trt AOT: {[(r.arch, round(r.parse_s, 1), round(r.build_s, 1)) for r in results]} "
          f"total {time.perf_counter() - start:.0f}s")
    assert all(r.engine_bytes > 100 * 2**20 for r in results)  # fp16 weights are in the plan
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["trt"]["cache_capacity"] == CAPACITY and manifest["model"]["num_layers"] == 30
