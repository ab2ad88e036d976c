"""Targets as one concept: the registry, and a new target added as one small class (a stub ort-cuda here)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from graphopt.cli.main import main
from graphopt.runtime.engine import OrtEngine
from graphopt.runtime.engine_api import open_engine
from graphopt.targets import get_target, register, targets, unregister
from graphopt.targets.base import Target, TargetError
from tiny_models import make_tiny_model


class OrtCuda(Target):  # the whole of a new target, for the test: ONNX Runtime's CUDA EP, lowered like ort-cpu
    name = "ort-cuda"
    description = "ONNX Runtime, CUDA execution provider (stub: the ort-cpu recipes, OrtEngine)"
    engine = "graphopt.runtime.engine:OrtEngine"
    family = "ort-cpu"


@pytest.fixture
def ort_cuda():
    register(OrtCuda())
    yield
    unregister("ort-cuda")


def test_built_in_targets_are_found_by_module():
    assert {"ort-cpu", "trt"} <= set(targets())
    assert get_target("ort-cpu").engine == "graphopt.runtime.engine:OrtEngine"
    assert get_target("trt").engine == "graphopt.runtime.engine_trt:TrtEngine"
    assert get_target("ort-cpu").recipe_name("int4") == "ort-cpu-int4"
    with pytest.raises(TargetError, match="unknown target 'tpu'; use one of canonical, ort-cpu, trt"):
        get_target("tpu")


def test_a_new_target_is_one_small_class(tmp_path: Path, ort_cuda) -> None:
    assert len(inspect.getsource(OrtCuda).splitlines()) <= 6  # nothing else in graphopt was edited for it
    source = make_tiny_model("llama", tmp_path / "hf")
    out = tmp_path / "art"
    result = CliRunner().invoke(main, ["build", str(source), "-o", str(out), "--target", "ort-cuda", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["target"] == "ort-cuda" and report["recipe"] == "ort-cpu"
    assert json.loads((out / "manifest.json").read_text())["target"] == "ort-cuda"
    engine = open_engine(out, max_slots=1, max_seq=32)
    assert isinstance(engine, OrtEngine) and not engine.capabilities.multi_row_multi_token
    engine.cache.allocate()
    logits = engine.prefill([[1, 5, 7]], [0])
    assert logits.shape == (1, engine.vocab_size) and np.isfinite(logits).all()
    generated = CliRunner().invoke(main, ["generate", str(out), "--prompt-ids", "1,5,7", "--max-new-tokens", "4",
                                          "--json"])  # the CLI opens it through the registry too
    assert generated.exit_code == 0, generated.output
    assert len(json.loads(generated.output)["token_ids"]) >= 1


def test_target_flags_and_recipes_are_checked_before_loading(tmp_path: Path, ort_cuda) -> None:
    missing = str(tmp_path / "no-such-model")  # never loaded: every case fails first
    cases = [(["--target", "tpu"], "unknown target 'tpu'"),
             (["--target", "ort-cuda", "--trt-max-seq", "64"], "--trt-max-seq only apply to --target trt"),
             (["--target", "ort-cuda", "--recipe", "trt"], "recipe trt is written for target 'trt', not 'ort-cuda'"),
             (["--target", "trt", "--kv-cache", "fp8"], "--kv-cache fp8 is not supported with --target trt")]
    for flags, message in cases:
        result = CliRunner().invoke(main, ["build", missing, "-o", str(tmp_path / "x"), *flags])
        assert result.exit_code == 2 and message in result.output, (flags, result.output)
    assert not (tmp_path / "x").exists()


def test_open_engine_refuses_an_unknown_target(tmp_path: Path) -> None:
    from graphopt.core.errors import ArtifactError
    from graphopt.runtime.engine_api import engine_path

    with pytest.raises(ArtifactError, match="unknown target 'ort-npu'.*manifest names it"):
        engine_path("ort-npu")
