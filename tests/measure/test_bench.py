"""graphopt bench on a tiny random llama: result structure, ratios, greedy agreement. No speed is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphopt.measure.bench import PROMPT_TEXT, benchmark_prompt, print_bench, run_bench, timed_loop, token_agreement
from graphopt.core.errors import RuntimeInputError
from graphopt.core.progress import QUIET
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from graphopt.build.artifact import BuildOptions, build
    from graphopt.passes.pipeline import load_recipe

    root = tmp_path_factory.mktemp("bench")
    hf_dir = make_tiny_model("llama", root / "hf")
    build(str(hf_dir), BuildOptions(load_recipe("ort-cpu"), root / "artifact"), QUIET)
    return root / "artifact"


def check_engine(engine: dict, repeats: int) -> None:
    assert engine["ttft_ms"] > 0 and engine["decode_tokens_per_s"] > 0
    assert len(engine["runs"]) == repeats
    assert all(run["ttft_ms"] > 0 and run["decode_tokens_per_s"] > 0 for run in engine["runs"])
    assert engine["load_s"] >= 0


def test_bench_vs_hf(artifact: Path, capsys: pytest.CaptureFixture) -> None:
    # default threads (the physical cores, torch's own default): set_num_threads leaves later tests alone
    results = run_bench(artifact, ["hf"], prompt_tokens=8, new_tokens=8, repeats=1, progress=QUIET)
    json.dumps(results)  # JSON-serialisable
    assert (results["prompt_tokens"], results["new_tokens"]) == (8, 8) and results["threads"] >= 1
    assert set(results["engines"]) == {"graphopt", "hf"}
    for engine in results["engines"].values():
        check_engine(engine, repeats=1)
    ours, hf = results["engines"]["graphopt"], results["engines"]["hf"]
    assert results["ratios"]["decode_vs_hf"] == pytest.approx(
        ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"], rel=1e-2)
    assert results["ratios"]["ttft_vs_hf"] == pytest.approx(hf["ttft_ms"] / ours["ttft_ms"], rel=1e-2)
    assert results["tokens_match"]["hf"] == {"match": True, "first_divergence": None, "compared": 8}
    assert results["machine"]["physical_cores"] >= 1
    print_bench(results)
    assert "decode tok/s" in capsys.readouterr().out


def test_bench_graphopt_only_has_no_ratios(artifact: Path) -> None:
    results = run_bench(artifact, [], prompt_tokens=4, new_tokens=3, repeats=2, progress=QUIET, threads=1)
    assert set(results["engines"]) == {"graphopt"}
    check_engine(results["engines"]["graphopt"], repeats=2)
    assert results["threads"] == 1 and results["ratios"] == {} and results["tokens_match"] == {}


def test_bench_genai(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install onnxruntime-genai)")
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    results = run_bench(artifact, ["genai"], prompt_tokens=8, new_tokens=8, repeats=1, progress=QUIET)
    check_engine(results["engines"]["genai"], repeats=1)
    assert set(results["ratios"]) == {"decode_vs_genai", "ttft_vs_genai"}
    assert results["tokens_match"]["genai"]["compared"] == 8
    assert len(list((tmp_path / "cache" / "genai").glob("*-fp32-og*/genai_config.json"))) == 1
    assert results["peer_precision"] == {"genai": "fp32"} and results["precision_mismatch"] == []


def test_bench_genai_int4_runs_genai_at_int4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """An int4 artifact is timed against GenAI's int4 model (same block, same accuracy_level), not its fp32."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install onnxruntime-genai)")
    from graphopt.build.artifact import BuildOptions, build
    from graphopt.build.precision import PrecisionFlags, precision_recipe

    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    hf_dir = make_tiny_model("llama", tmp_path / "hf")
    words = tmp_path / "words.txt"  # the tiny word-level tokenizer knows w4 … w95 only
    words.write_text(" ".join(f"w{4 + i % 90}" for i in range(600)))
    recipe = precision_recipe(PrecisionFlags(int4=True), None, "ort-cpu")
    build(str(hf_dir), BuildOptions(recipe, tmp_path / "int4", calib_text=words, calib_tokens=256, eval_text=words,
                                    eval_tokens=128), QUIET)
    results = run_bench(tmp_path / "int4", ["genai"], prompt_tokens=8, new_tokens=8, repeats=1, progress=QUIET)
    assert results["peer_precision"] == {"genai": "int4"} and results["precision_mismatch"] == []
    assert results["genai_model"] == {"precision": "int4", "block_size": 32, "accuracy_level": 4, "mismatch": None}
    assert len(list((tmp_path / "cache" / "genai").glob("*-int4-b32-a4-og*/genai_config.json"))) == 1
    print_bench(results)
    assert "genai int4" in capsys.readouterr().out


@pytest.mark.parametrize(("peers", "prompt_tokens", "new_tokens", "repeats"), [
    (["vllm"], 8, 8, 1), ([], 0, 8, 1), ([], 8, 1, 1), ([], 8, 8, 0)])
def test_bench_refuses_bad_arguments(artifact: Path, peers, prompt_tokens, new_tokens, repeats) -> None:
    with pytest.raises(RuntimeInputError):
        run_bench(artifact, peers, prompt_tokens, new_tokens, repeats, progress=QUIET)


def test_benchmark_prompt_has_exact_length() -> None:
    class Words:  # a whitespace tokenizer: one id per word
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [len(word) for word in text.split()]}

    words = len(PROMPT_TEXT.split())
    assert len(benchmark_prompt(Words(), 5)) == 5
    long = benchmark_prompt(Words(), 2 * words + 3)
    assert len(long) == 2 * words + 3 and long[:words] == long[words:2 * words]


def test_timed_loop_counts_tokens_and_token_agreement() -> None:
    run = timed_loop(lambda: 1, lambda token: token + 1, 5)
    assert run.tokens == [1, 2, 3, 4, 5] and run.ttft_ms >= 0 and run.decode_tokens_per_s > 0
    assert token_agreement([1, 2, 3], [1, 2, 3]) == {"match": True, "first_divergence": None, "compared": 3}
    assert token_agreement([1, 2, 3], [1, 5, 3])["first_divergence"] == 1
    assert token_agreement([1, 2], [1, 2, 3])["first_divergence"] == 2


def test_chat_workload_bench(artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    """A small chat workload: prefix cache on and off and GenAI give the same greedy answers; the structure
    the issue names; the plot is written. No speed is asserted."""
    pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (pip install onnxruntime-genai)")
    from graphopt.measure.bench_chat import chat_workload, plot_chat, print_chat_bench, run_chat_bench

    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    workload = chat_workload(64, conversations=3, system_tokens=40, turns=3, answer_tokens=6, turn_tokens=(4, 12))
    results = run_chat_bench(artifact, ["genai"], repeats=2, threads=1, progress=QUIET, workload=workload)
    json.dumps(results)
    assert results["workload"] == "chat" and set(results["engines"]) == {"graphopt", "graphopt-no-prefix-cache",
                                                                          "genai"}
    assert set(results["ratios"]) == {"ttft_p50_vs_no_prefix_cache", "throughput_vs_no_prefix_cache",
                                      "ttft_p50_vs_genai", "throughput_vs_genai"}
    assert results["answers_equal_graphopt"] == {"graphopt-no-prefix-cache": 1.0, "genai": 1.0}
    ours = results["engines"]["graphopt"]
    # 9 turns: the two later conversations copy the system prompt, every later turn takes its slot over
    assert ours["prefix_cache_hit_rate"] == pytest.approx(8 / 9, abs=1e-3)
    assert len(ours["ttft_per_turn_ms"]) == 3 and all(r["tokens_per_s"] > 0 for r in ours["runs"])
    assert "prefix_cache_hit_rate" not in results["engines"]["genai"]
    plot_chat(results, tmp_path / "chat.png")
    assert (tmp_path / "chat.png").stat().st_size > 1000
    print_chat_bench(results)
    assert "ttft_p50_vs_no_prefix_cache" in capsys.readouterr().out
