"""The TensorRT engine backend: importable without TensorRT or a GPU, refusing with one-line errors that name
the fix; on a GPU machine with TensorRT it runs a trt artifact like OrtEngine (skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.core.errors import ArtifactError
from graphopt.targets.trt_aot import full_tensorrt
from trt_helpers import built


def test_import_safe_and_factory() -> None:
    import graphopt.runtime.engine_trt as module
    from graphopt.runtime.engine import OrtEngine
    from graphopt.runtime.engine_api import open_engine

    assert module.TrtEngine.step.__doc__
    assert isinstance(open_engine(_ort_artifact()), OrtEngine)


def _ort_artifact():
    return built("ort-cpu")


def test_refuses_without_tensorrt_or_for_ort_artifacts() -> None:
    from graphopt.runtime.engine_trt import TrtEngine

    with pytest.raises(ArtifactError, match="targets 'ort-cpu'; TrtEngine runs --target trt"):
        TrtEngine(_ort_artifact())
    if full_tensorrt() is None:
        with pytest.raises(ArtifactError, match="needs the `tensorrt` package and a CUDA GPU; use OrtEngine"):
            TrtEngine(built("trt"))


@pytest.mark.gpu
@pytest.mark.skipif(full_tensorrt() is None, reason="needs the `tensorrt` package and a CUDA GPU")
def test_engine_matches_ort_on_gpu(tmp_path) -> None:
    import shutil

    from graphopt.runtime.engine_trt import TrtEngine
    from graphopt.targets.trt_aot import build_engine
    from trt_helpers import run_steps, session

    artifact = tmp_path / "art"
    shutil.copytree(built("trt"), artifact)
    build_engine(artifact)
    engine = TrtEngine(artifact, max_slots=2)
    prompts = [[5, 6, 7, 8], [9, 10]]
    for _ in prompts:
        engine.cache.allocate()
    first = engine.prefill(prompts, [0, 1])
    second = engine.decode([11, 12])
    expected = run_steps(session(artifact), prompts, [[11, 12]], engine.max_seq)
    assert np.abs(first - np.stack([expected[0][0, 3], expected[0][1, 1]])).max() <= 2e-2
    assert np.abs(second - expected[1][:, 0]).max() <= 2e-2
