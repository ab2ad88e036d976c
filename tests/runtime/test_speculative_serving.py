"""Speculative decoding through the surfaces: CLI generate/bench flags, the server's /metrics, the bench summary."""

from __future__ import annotations

import pytest

import json
import subprocess
import sys

import openai
from click.testing import CliRunner

from graphopt.measure.bench_spec import print_spec_bench, run_spec_bench
from graphopt.cli.main import main
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.config import LLMConfig
from graphopt.runtime.server import ServerConfig
from graphopt.runtime.speculative import SpecConfig
from serving_artifact import ServerThread, metric, tiny_artifact


def test_cli_generate_with_a_draft_matches_plain(monkeypatch) -> None:
    pools = []  # the CLI asks for one shared ORT thread pool; in this test process it must not really switch
    monkeypatch.setattr("graphopt.runtime.engine.use_global_thread_pool", lambda threads: pools.append(threads) or 2)
    artifact, runner = tiny_artifact(), CliRunner()
    args = ["generate", str(artifact), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "12", "--json"]
    plain = json.loads(runner.invoke(main, args, catch_exceptions=False).output)
    drafted = json.loads(runner.invoke(main, args + ["--draft", str(artifact), "-k", "3", "--fixed-k"],
                                       catch_exceptions=False).output)
    ngram = json.loads(runner.invoke(main, args + ["--speculative", "ngram"], catch_exceptions=False).output)
    assert drafted["token_ids"] == plain["token_ids"] == ngram["token_ids"]
    assert plain["speculative"] is None and drafted["speculative"]["acceptance_rate"] == 1.0
    assert pools == [None]  # --draft only; n-gram lookup has no second session
    both = runner.invoke(main, args + ["--draft", str(artifact), "--speculative", "ngram"])
    assert both.exit_code == 2 and "either --draft DRAFT or --speculative ngram" in both.output
    missing = runner.invoke(main, args + ["--draft", "/nonexistent"])
    assert missing.exit_code == 2 and "is not a graphopt artifact" in missing.output


@pytest.mark.integration
def test_cli_draft_in_its_own_process_shares_one_thread_pool() -> None:
    """For real (a subprocess: ORT's global thread pool is process-wide), greedy tokens equal plain generate's."""
    artifact = tiny_artifact()
    args = [sys.executable, "-c", "from graphopt.cli.main import main; main()", "generate", str(artifact), "--prompt-ids",
            "5,6,7,8", "--max-new-tokens", "10", "--json"]
    runs = [subprocess.run(args + extra, capture_output=True, text=True, check=True, timeout=120)
            for extra in ([], ["--draft", str(artifact), "-k", "2"])]
    plain, drafted = (json.loads(run.stdout) for run in runs)
    assert drafted["token_ids"] == plain["token_ids"] and drafted["speculative"]["rounds"] > 0


def test_metrics_report_acceptance() -> None:
    artifact = tiny_artifact()
    llm = LLM(artifact, max_slots=2, threads=1,
              speculative=SpecConfig(draft=artifact, num_speculative_tokens=3, adaptive=False))
    config = ServerConfig(artifact, llm=LLMConfig(max_slots=2, threads=1), model_name="tiny")
    with ServerThread(config, llm) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
        done = client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=9, temperature=0,
                                         extra_body={"ignore_eos": True})
        plain = LLM(artifact, max_slots=1, threads=1).generate("w5 w6 w7", SamplingParams(max_new_tokens=9,
                                                                                            ignore_eos=True))
        assert done.choices[0].text == plain[0].text and done.usage.completion_tokens == 9
        drafts = metric(server.port, "graphopt_spec_draft_tokens_total")
        assert drafts > 0 and metric(server.port, "graphopt_spec_accepted_tokens_total") == drafts
        assert metric(server.port, "graphopt_spec_acceptance_rate") == 1.0
        rounds = metric(server.port, "graphopt_spec_verifications_total")
        assert metric(server.port, "graphopt_spec_mean_accepted_length") == drafts / rounds + 1
        assert metric(server.port, "graphopt_generation_tokens_total") == 9
        assert metric(server.port, "graphopt_spec_request_acceptance_rate_count") == 1
        assert metric(server.port, "graphopt_spec_request_acceptance_rate_sum") == 1.0


def test_server_config_builds_a_speculating_llm() -> None:
    from graphopt.runtime.server import OpenAIServer

    spec = SpecConfig(method="ngram", num_speculative_tokens=2)
    server = OpenAIServer(ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=2, threads=1, speculative=spec)))
    assert server.llm.speculator is not None and server.llm.speculator.config.num_speculative_tokens == 2


def test_spec_bench_summary(capsys) -> None:
    artifact = tiny_artifact()
    result = run_spec_bench(artifact, SpecConfig(method="ngram", num_speculative_tokens=3, adaptive=False), "repeat",
                            16, 12, repeats=1, concurrency=3, threads=1)
    assert result["tokens_match"] and result["concurrent"]["tokens_match"]
    assert result["speedup"] > 0 and result["runs"]["plain"] and result["runs"]["speculative"]
    if result["mean_k"]:
        assert result["predicted_speedup"] is not None and 0 <= result["alpha"] <= 1
    print_spec_bench(result)
    out = capsys.readouterr().out
    assert "predicted" in out and "3 concurrent requests" in out
