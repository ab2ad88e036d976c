"""The server's limits and refusals on a tiny random llama: header/body deadlines, a connection cap answered
with 503, uploads cut short, bodies Python's json cannot read, requests that can never fit, tokenization off
the event loop, generation_config.json defaults, and the Host/Origin/Content-Type checks without an API key."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time

import pytest

from graphopt.core.errors import ArtifactError, RuntimeInputError
from graphopt.runtime.llm import LLM
from graphopt.runtime.openai_protocol import generation_defaults, request_defaults
from graphopt.runtime.config import LLMConfig
from graphopt.runtime.server import ServerConfig
from serving_artifact import ServerThread, metric, tiny_artifact

BODY = {"model": "tiny", "prompt": "w4 w5", "max_tokens": 4, "ignore_eos": True}


class RecordingTokenizer:
    """The artifact's tokenizer, noting which threads encode prompts."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.threads: set[str] = set()

    def __call__(self, *args, **kwargs):
        self.threads.add(threading.current_thread().name)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def open_server():
    """No API key (so Host/Origin/Content-Type are checked), short deadlines, a queue of 4."""
    config = ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=2, max_queue=4, threads=1),
                          model_name="tiny", header_timeout=0.5, body_timeout=0.5)
    llm = LLM(config.artifact, max_slots=2, max_queue=4, threads=1)
    llm.tokenizer = RecordingTokenizer(llm.tokenizer)
    with ServerThread(config, llm) as running:
        yield running


def _request(port: int, body: bytes | dict, headers: dict | None = None, path: str = "/v1/completions",
             method: str = "POST") -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    is_json = (response.getheader("content-type") or "").startswith("application/json")
    return response.status, json.loads(data) if is_json else {}


def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_late_headers_get_408_and_the_connection_closes(open_server) -> None:
    answer = _raw(open_server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert answer.startswith(b"HTTP/1.1 408 ") and b"request headers not received in time" in answer


def test_a_late_body_gets_408_naming_the_body(open_server) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\"")
    answer = _raw(open_server.port, head)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"param":"body"' in answer.replace(b" ", b"")


def test_a_client_leaving_mid_upload_is_one_line_not_a_500(open_server, caplog) -> None:
    port = open_server.port
    errors = metric(port, 'graphopt_http_requests_total{endpoint="completions",status="500"}')
    with caplog.at_level(logging.INFO, logger="graphopt"):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"prompt\": \"w4")
            time.sleep(0.05)  # let the server start reading the body (not a timing assertion)
        name = 'graphopt_http_requests_total{endpoint="completions",status="499"}'
        deadline = time.monotonic() + 10
        while metric(port, name) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert metric(port, name) >= 1
    assert metric(port, 'graphopt_http_requests_total{endpoint="completions",status="500"}') == errors
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert any("left while sending its request body" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("raw", "param"), [
    (b'{"model": "tiny", "prompt": "w4", "seed": ' + b"9" * 5000 + b"}", "body"),
    (b'{"model": "tiny", "prompt": "w4", "max_tokens": ' + b"1" * 5000 + b"}", "body"),
    (b'{"model": "tiny", "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b', "prompt": "w4"}', "body"),
    (b'{"model": "tiny", "prompt": "w4 \\ud800"}', "body"),
    (json.dumps({"model": "tiny", "prompt": ["w4"] * 10}).encode(), "prompt"),  # the queue holds 4
    (json.dumps({**BODY, "repetition_penalty": 1e-300}).encode(), "repetition_penalty"),
    (json.dumps({**BODY, "stop": ["x" * 257]}).encode(), "stop"),
    (json.dumps({**BODY, "stop": ["x"] * 17}).encode(), "stop"),
])
def test_bodies_that_cannot_be_served_get_400_naming_the_field(open_server, raw: bytes, param: str) -> None:
    status, payload = _request(open_server.port, raw)
    assert (status, payload["error"]["param"]) == (400, param), payload


def test_prompts_are_tokenized_off_the_event_loop(open_server) -> None:
    status, _ = _request(open_server.port, BODY)
    threads = open_server.server.llm.tokenizer.threads
    assert status == 200 and threads and all(name.startswith("graphopt-tokenize") for name in threads), threads


def test_omitted_sampling_fields_follow_generation_config(open_server, tmp_path) -> None:
    assert request_defaults(tiny_artifact()) == {"temperature": 0.0}  # no do_sample: greedy, as transformers
    status, default = _request(open_server.port, {**BODY, "max_tokens": 8})
    status_greedy, greedy = _request(open_server.port, {**BODY, "max_tokens": 8, "temperature": 0})
    assert status == status_greedy == 200 and default["choices"][0]["text"] == greedy["choices"][0]["text"]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6,
                                                                 "top_p": 0.9, "top_k": 50}))
    assert request_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 50}
    assert generation_defaults(tiny_artifact(), str(tmp_path)) == request_defaults(tmp_path)  # --generation-config DIR
    assert generation_defaults(tiny_artifact(), "vllm") == generation_defaults(tiny_artifact(), "none") == {}
    with pytest.raises(RuntimeInputError, match="no generation_config.json"):
        generation_defaults(tiny_artifact(), str(tmp_path / "missing"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": "hot"}))
    with pytest.raises(ArtifactError, match="temperature"):
        request_defaults(tmp_path)


@pytest.mark.parametrize(("headers", "status", "param"), [
    ({"Host": "evil.example:8000"}, 403, "host"),
    ({"Origin": "http://evil.example"}, 403, "origin"),
    ({"Content-Type": "text/plain"}, 415, "content-type"),
    ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "content-type"),
])
def test_without_a_key_foreign_pages_are_refused(open_server, headers: dict, status: int, param: str) -> None:
    code, payload = _request(open_server.port, BODY, headers)
    assert (code, payload["error"]["param"]) == (status, param), payload


def test_without_a_key_local_and_same_origin_requests_are_served(open_server) -> None:
    port = open_server.port
    for headers in ({"Host": f"localhost:{port}"}, {"Origin": f"http://127.0.0.1:{port}"},
                    {"Content-Type": "application/json; charset=utf-8"}):
        assert _request(port, BODY, headers)[0] == 200, headers


def test_with_a_key_host_and_origin_are_not_checked() -> None:
    config = ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=1, threads=1), api_key="sk-k", model_name="tiny")
    with ServerThread(config) as running:
        code, _ = _request(running.port, BODY, {"Host": "evil.example", "Origin": "http://evil.example",
                                                "Authorization": "Bearer sk-k"})
        assert code == 200


def test_connections_past_the_cap_get_503_not_a_reset() -> None:
    config = ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=1, threads=1),
                          model_name="tiny", max_connections=2)
    with ServerThread(config) as running:
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=30) for _ in range(2)]
        try:
            status, payload = _request(running.port, b"", path="/health", method="GET")
            assert status == 503 and "too many open connections" in payload["error"]["message"]
            for _ in range(3):  # silent connections past the cap are answered and closed by the server itself
                assert _raw(running.port, b"").startswith(b"HTTP/1.1 503 ")
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while (status := _request(running.port, b"", path="/health", method="GET")[0]) != 200 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status == 200
