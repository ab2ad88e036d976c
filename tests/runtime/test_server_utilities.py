"""/tokenize, /detokenize, /version, the vLLM-style serve flags and the throughput log line."""

from __future__ import annotations

import http.client
import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from graphopt import __version__
from graphopt.cli.main import main
from graphopt.runtime.config import LLMConfig
from graphopt.runtime.server import ServerConfig
from graphopt.runtime.utility_routes import ThroughputLog
from serving_artifact import ServerThread, tiny_artifact


@pytest.fixture(scope="module")
def server():
    with ServerThread(ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=2, threads=1), model_name="tiny")) as s:
        yield s


def _call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def test_tokenize_and_detokenize_round_trip(server) -> None:
    tokenizer = server.server.llm.tokenizer
    status, out = _call(server.port, "POST", "/tokenize", {"model": "tiny", "prompt": "w4 w5 w17"})
    assert status == 200 and out["tokens"] == list(tokenizer("w4 w5 w17")["input_ids"])
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == server.server.llm.max_seq
    status, back = _call(server.port, "POST", "/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and back["prompt"] == tokenizer.decode(out["tokens"])
    assert "w17" in back["prompt"]
    status, chat = _call(server.port, "POST", "/tokenize", {"messages": [{"role": "user", "content": "w4 w5"}]})
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "w4 w5"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    assert status == 200 and chat["tokens"] == list(expected)


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": "w4", "messages": []}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "w4", "temperature": 1}, 400, "temperature"),
    ("/tokenize", {"model": "other", "prompt": "w4"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "w4"}, 400, "tokens"),
])
def test_bad_utility_requests_name_the_field(server, path: str, body: dict, status: int, param: str) -> None:
    got, out = _call(server.port, "POST", path, body)
    assert got == status and out["error"]["param"] == param, out


def test_version(server) -> None:
    assert _call(server.port, "GET", "/version") == (200, {"version": __version__})


def test_vllm_flag_names_are_accepted(tmp_path) -> None:
    result = CliRunner().invoke(main, ["serve", str(tmp_path / "none"), "--max-num-seqs", "2", "--max-model-len", "64",
                                       "--served-model-name", "m"])
    assert result.exit_code == 2 and "is not a graphopt artifact" in result.output  # the flags parsed


def test_throughput_line_counts_since_the_last_one() -> None:
    metrics = SimpleNamespace(total_prompt_tokens=0, total_generation_tokens=0)
    active = [0]
    log = ThroughputLog(metrics, lambda: active[0], lambda: 3, 8, interval=10.0)
    assert log.line() is None  # nothing served yet
    metrics.total_prompt_tokens, metrics.total_generation_tokens, active[0] = 500, 40, 2
    line = log.line()
    assert line.startswith("throughput: prompt ") and "slots 2/8, waiting 3" in line
    prompt_rate = float(line.split("prompt ")[1].split(" tok/s")[0])
    assert prompt_rate > 0
    active[0] = 0
    assert log.line() is None  # idle again: no line
