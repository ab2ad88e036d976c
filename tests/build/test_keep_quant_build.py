"""graphopt build MODEL.gguf --keep-quant end to end, on a tiny Llama whose projections are Q4_1 and whose
embedding is Q8_0 (tests/gguf_quant_files.py), traced once:
- the kept artifact (MatMulNBits computing in fp32, int8 as two 4-bit halves, corrections packed by
  fuse-qkv-rope) gives the fp32
  build's logits through prefill and decode, and its weights are a fraction of fp32's;
- bad input (an unquantized GGUF, a type with no exact form, a Hugging Face folder) is one line naming the
  tensor and its type, exit 2, before anything is converted or written;
- a plain build of a quantized GGUF prints one note about --keep-quant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gguf_quant_files import write_quantized_gguf
from graphopt.build import quant as quant_build
from graphopt.build.artifact import BuildOptions, build_traced, load, trace_loaded
from graphopt.build.precision import PrecisionFlags, precision_recipe
from graphopt.cli.main import main
from graphopt.core.progress import QUIET
from graphopt.passes.pipeline import load_recipe
from graphopt.runtime.engine import OrtEngine
from tiny_models import make_tiny_model

PROMPTS = ((5, 9, 3), 10)  # prompt lengths, decode steps


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep-quant")
    gguf_path = write_quantized_gguf(root / "tiny-q4_1.gguf", "Q4_1", embedding="Q8_0")
    words = root / "words.txt"
    words.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(4, 200, 400)))
    reports = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRAPHOPT_CACHE", str(root / "cache"))
        loaded = load(str(gguf_path), "sdpa", QUIET)
        trace_loaded(loaded, QUIET)
        for name, recipe in (("fp32", load_recipe("ort-cpu")), ("kept", precision_recipe(PrecisionFlags(keep_quant=True), None, "ort-cpu")),
                             ("fast", load_recipe("ort-cpu-keep-quant-fast"))):
            options = BuildOptions(recipe, root / name, eval_text=words, eval_tokens=64)
            context = quant_build.context_for(options, loaded, QUIET)
            reports[name] = build_traced(loaded, options, QUIET, context, copy=True)
    return root, reports


def _steps(artifact: Path) -> list[np.ndarray]:
    engine = OrtEngine(artifact, max_slots=3, max_seq=64)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 200, size=n).tolist() for n in PROMPTS[0]]
    for _ in prompts:
        engine.cache.allocate()
    steps = [engine.prefill(prompts, slots=[0, 1, 2]).copy()]
    steps += [engine.decode(rng.integers(3, 200, size=3)).copy() for _ in range(PROMPTS[1])]
    return steps


def test_kept_artifact_gives_the_fp32_logits(built) -> None:
    root, reports = built
    worst = max(float(np.abs(a - b).max()) for a, b in zip(_steps(root / "fp32"), _steps(root / "kept")))
    assert worst < 1e-4, worst
    stats = {p["name"]: p["stats"] for p in reports["kept"]["passes"]}
    assert stats["keep-quant"] == {"matmuls_q4_1": 15, "offset_corrections": 15, "embedding_q8_0": 1}
    assert stats["fuse-qkv-rope"]["packed_qkv_corrections"] == 2
    assert reports["kept"]["precision"]["weights"].startswith("gguf 15 Q4_1, 1 Q8_0 kept exactly")
    assert reports["kept"]["fidelity"]["kl_mean"] < 1e-6 and reports["kept"]["fidelity"]["budget"]["kl_max"] == 1e-4


def test_fast_recipe_keeps_the_blocks_with_int8_activations(built) -> None:
    """ort-cpu-keep-quant-fast: the same blocks, MatMulNBits at accuracy_level 4 (the input rounded to int8 in
    blocks, as llama.cpp does): close to the exact build, not equal. (Here the head is Q4_1 and the Q8_0
    embedding is a Gather, so no 8-bit MatMulNBits is made.)"""
    import onnx

    root, reports = built
    nodes = [n for n in onnx.load(str(root / "fast" / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    kept = [n for n in onnx.load(str(root / "kept" / "model.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits"]
    assert {a["accuracy_level"] for a in attrs} == {4} and {a["bits"] for a in attrs} == {4}
    assert len(nodes) == len(kept) and {a.i for n in kept for a in n.attribute if a.name == "accuracy_level"} == {1}
    worst = max(float(np.abs(a - b).max()) for a, b in zip(_steps(root / "fp32"), _steps(root / "fast")))
    assert 1e-4 < worst < 0.5, worst
    assert 0 < reports["fast"]["fidelity"]["kl_mean"] < 0.01
    budget = reports["fast"]["fidelity"]["budget"]  # the recipe's own [budget], not the exact build's 1e-4
    assert (budget["kl_max"], budget["from"]) == (0.01, "recipe ort-cpu-keep-quant-fast")
    assert reports["fast"]["precision"]["weights"] == reports["kept"]["precision"]["weights"]
    label = "int8 per weight block inside MatMulNBits (accuracy_level 4), fp32 elsewhere"
    assert reports["fast"]["precision"]["activations"] == label
    assert reports["kept"]["precision"]["activations"] == "fp32"


def test_kept_weights_are_smaller(built) -> None:
    _, reports = built
    assert reports["kept"]["artifact_bytes"] < 0.6 * reports["fp32"]["artifact_bytes"]


def _fails(args: list[str], env: dict, *fragments: str) -> str:
    result = CliRunner().invoke(main, args, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("error: --keep-quant"), lines
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


@pytest.mark.parametrize("kind,embedding,fragments", [
    ("F32", "F16", ("holds no pre-quantized weights", "is F")),
    ("IQ4_NL", "Q8_0", ("tensor 'blk.0.attn_q.weight'", "is IQ4_NL", "no exact")),
])
def test_bad_gguf_is_one_line(tmp_path: Path, kind: str, embedding: str, fragments: tuple) -> None:
    gguf_path = write_quantized_gguf(tmp_path / "tiny.gguf", kind, embedding=embedding)
    env = {"GRAPHOPT_CACHE": str(tmp_path / "cache")}
    _fails(["build", str(gguf_path), "--keep-quant", "-o", str(tmp_path / "out")], env, *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_hugging_face_folder_is_one_line(tmp_path: Path) -> None:
    folder = make_tiny_model("llama", tmp_path / "hf")
    _fails(["build", str(folder), "--keep-quant", "-o", str(tmp_path / "out")], {},
           "Hugging Face folder", "(tensor '", "' is F32)")
    assert not (tmp_path / "out").exists()


def test_plain_build_of_a_quantized_gguf_notes_keep_quant(tmp_path: Path) -> None:
    gguf_path = write_quantized_gguf(tmp_path / "tiny.gguf", "Q4_1")
    (tmp_path / "out").mkdir()  # an existing destination: the build stops before loading, after the note
    result = CliRunner().invoke(main, ["build", str(gguf_path), "-o", str(tmp_path / "out")],
                                env={"GRAPHOPT_CACHE": str(tmp_path / "cache")})
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert result.exit_code == 2 and len(notes) == 1, result.output
    assert "15 Q4_1, 1 Q8_0 tensors" in notes[0] and "--keep-quant keeps them exactly" in notes[0]
