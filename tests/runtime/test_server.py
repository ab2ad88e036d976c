"""The OpenAI-compatible server on a tiny random llama: the real ``openai`` client, batch invariance, bad
requests, API keys, overload (429), and cancellation on disconnect (checked through /metrics)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import openai
import pytest

from graphopt.runtime.llm import LLM
from graphopt.runtime.config import LLMConfig
from graphopt.runtime.server import ServerConfig
from serving_artifact import ServerThread, metric, tiny_artifact

KEY = "sk-test-key"
SLOTS_IN_USE = "graphopt_slots_in_use"
CANCELLED = 'graphopt_requests_total{status="cancelled"}'


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(tiny_artifact(),
                          llm=LLMConfig(max_slots=16, max_queue=64, threads=1, max_batch_tokens=64),
                          api_key=KEY, model_name="tiny", max_body_bytes=64 * 1024)
    with ServerThread(config) as running:
        yield running


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=30)


class SlowLLM(LLM):
    """A real LLM whose steps take at least 20 ms, so requests stay in flight long enough to overload/cancel."""

    def step(self):
        time.sleep(0.02)
        return super().step()


@pytest.fixture(scope="module")
def slow_server():
    config = ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=1, max_queue=1, threads=1),
                          model_name="tiny", shutdown_timeout=1.0)
    with ServerThread(config, SlowLLM(config.artifact, max_slots=1, max_queue=1, threads=1)) as running:
        yield running


def _post(port: int, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=raw, headers=headers)
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, payload


def _wait_for(port: int, name: str, value: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while (current := metric(port, name)) != value and time.monotonic() < deadline:
        time.sleep(0.02)
    return current


def test_openai_client_completions_and_chat(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    full = client.completions.create(model="tiny", prompt="w4 w5 w6", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True})
    choice = full.choices[0]
    assert choice.finish_reason == "length" and len(choice.text.split()) == 8
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (3, 8)
    streamed = client.completions.create(model="tiny", prompt="w4 w5 w6", max_tokens=8, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text and chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    message = chat.choices[0].message
    assert message.role == "assistant" and len(message.content.split()) <= 6 and chat.usage.completion_tokens == 6
    assert len(chat.choices[0].logprobs.content) == 6 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == message.content
    assert parts[-1].usage.completion_tokens == 6 and parts[-2].choices[0].finish_reason == "length"


def test_stop_strings_and_multiple_prompts(client: openai.OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt="w7 w8", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    words = base.choices[0].text.split()
    cut = client.completions.create(model="tiny", prompt="w7 w8", max_tokens=6, temperature=0, stop=[f" {words[2]}"],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == " " + " ".join(words[:2]) and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="tiny", prompt=["w7 w8", [9, 10, 11]], max_tokens=3, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in many.choices] == [0, 1] and many.choices[0].text.split() == words[:3]
    assert many.usage.prompt_tokens == 5 and many.usage.completion_tokens == 6


def test_n_choices_share_the_prompt_and_usage_counts_it_once(server, client: openai.OpenAI) -> None:
    prompt = " ".join(f"w{i}" for i in range(4, 44))
    hits = metric(server.port, "graphopt_prefix_cache_hits_total")
    many = client.completions.create(model="tiny", prompt=prompt, n=3, max_tokens=5, temperature=1.0, seed=7,
                                     extra_body={"ignore_eos": True})
    prompt_tokens = many.usage.prompt_tokens
    assert [c.index for c in many.choices] == [0, 1, 2] and prompt_tokens >= 40
    assert many.usage.completion_tokens == 15 and many.usage.prompt_tokens_details.cached_tokens == 0
    assert len({c.text for c in many.choices}) > 1  # seeds 7, 8, 9
    assert metric(server.port, "graphopt_prefix_cache_hits_total") - hits >= 2  # the 2nd and 3rd copy the 1st
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=1.0, seed=8,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == many.choices[1].text  # seed 8 is the second choice's, its prompt now cached
    assert again.usage.prompt_tokens_details.cached_tokens == prompt_tokens - 1
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], n=2,
                                          max_tokens=4, temperature=0, stream=True,
                                          stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    parts = list(chat)
    texts = ["".join(p.choices[0].delta.content or "" for p in parts if p.choices and p.choices[0].index == i)
             for i in (0, 1)]
    assert texts[0] == texts[1] and texts[0] and parts[-1].usage.completion_tokens == 8


def test_best_of_returns_the_most_likely_of_its_samples(server, client: openai.OpenAI) -> None:
    prompt = " ".join(f"w{i}" for i in range(10, 30))
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=4, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    samples = client.completions.create(n=4, logprobs=0, **kwargs)  # the same four seeds best_of=4 draws
    totals = [sum(c.logprobs.token_logprobs) for c in samples.choices]
    best = client.completions.create(n=2, best_of=4, **kwargs)
    ranked = sorted(range(4), key=lambda i: -totals[i])[:2]
    assert [c.text for c in best.choices] == [samples.choices[i].text for i in sorted(ranked)]
    assert best.choices[0].logprobs is None and best.usage.completion_tokens == 16  # all four were generated
    body = {"model": "tiny", "prompt": prompt, "n": 2, "best_of": 4, "stream": True}
    code, _, payload = _post(server.port, "/v1/completions", body)
    assert (code, payload["error"]["param"]) == (400, "best_of")


def test_greedy_output_is_the_same_alone_and_among_16_concurrent(server, client: openai.OpenAI) -> None:
    prompts = [" ".join(f"w{4 + (7 * i + 3 * j) % 90}" for j in range(3 + 5 * i % 40)) for i in range(16)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

    async def together() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60)
        results = await asyncio.gather(*(async_client.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}) for p in prompts))
        await async_client.close()
        return [r.choices[0].text for r in results]

    assert asyncio.run(together()) == alone
    assert _wait_for(server.port, SLOTS_IN_USE, 0) == 0


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "tiny", "prompt": "w4", "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "w4", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "w4", "temperature": True}, 400, "temperature"),
    ({"model": "tiny", "prompt": "w4", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "w4", "colour": "red"}, 400, "colour"),
    ({"model": "tiny", "max_tokens": 4}, 400, "prompt"),
    ({"model": "tiny", "prompt": "w4 " * 300}, 400, "prompt"),
    ({"model": "tiny", "prompt": "w4", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [5, 999]}, 400, "prompt"),
    ({"model": "other", "prompt": "w4"}, 404, "model"),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "body"),
    (b'{"model": "tiny", "prompt": ', 400, "body"),
    (b"[1, 2]", 400, "body"),
    (json.dumps({"model": "tiny", "prompt": "w4 " * 30000}).encode(), 400, "body"),
])
def test_bad_completion_requests_name_the_field(server, body, status: int, param: str) -> None:
    code, _, payload = _post(server.port, "/v1/completions", body)
    assert (code, payload["error"]["param"]) == (status, param), payload
    assert payload["error"]["type"] == "invalid_request_error" and payload["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "w4"}]}, "messages[0]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "w4"}], "top_logprobs": 50}, "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "w4"}], "n": 0}, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "w4"}], "n": 65}, "n"),
])
def test_bad_chat_requests_name_the_field(server, body, param: str) -> None:
    code, _, payload = _post(server.port, "/v1/chat/completions", body)
    assert (code, payload["error"]["param"]) == (400, param), payload


def test_unknown_paths_and_methods_get_openai_errors(server) -> None:
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request(method, path)
        response = conn.getresponse()
        assert response.status == status and json.loads(response.read())["error"]["message"].startswith(method)


def test_api_key_is_required_on_v1_only(server) -> None:
    body = {"model": "tiny", "prompt": "w4", "max_tokens": 1}
    for key in (None, "sk-wrong"):
        code, _, payload = _post(server.port, "/v1/completions", body, key=key)
        assert code == 401 and payload["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0).models.list()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    assert metric(server.port, 'graphopt_http_requests_total{endpoint="completions",status="401"}') >= 2


def _open_stream(port: int, max_tokens: int = 200) -> http.client.HTTPConnection:
    """Start a streaming completion and read its first event; returns the open connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": "tiny", "prompt": "w4 w5", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: {")
    conn.response = response  # type: ignore[attr-defined]
    return conn


def test_full_queue_answers_429_and_disconnects_free_slots(slow_server) -> None:
    port = slow_server.port
    cancelled = metric(port, CANCELLED)
    running = _open_stream(port)  # holds the only slot
    queued = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    queued.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "w6", "max_tokens": 200}),
                   headers={"Content-Type": "application/json"})  # non-streaming: waits in the queue
    assert _wait_for(port, "graphopt_queue_length", 1) == 1
    code, headers, payload = _post(port, "/v1/completions", {"model": "tiny", "prompt": "w7", "max_tokens": 2})
    assert code == 429 and headers["retry-after"] == "1" and payload["error"]["code"] == "queue_full"
    assert metric(port, SLOTS_IN_USE) == 1
    queued.close()  # a non-streaming client that leaves is cancelled too (before it got a slot)
    assert _wait_for(port, "graphopt_queue_length", 0) == 0
    running.close()  # a streaming client disconnects mid-stream: its slot is freed at the next step
    assert _wait_for(port, SLOTS_IN_USE, 0) == 0
    assert _wait_for(port, CANCELLED, cancelled + 2) == cancelled + 2


def test_non_streaming_disconnect_frees_the_slot(slow_server) -> None:
    port = slow_server.port
    cancelled = metric(port, CANCELLED)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "w4", "max_tokens": 200,
                                                             "ignore_eos": True}))
    assert _wait_for(port, SLOTS_IN_USE, 1) == 1
    conn.close()
    assert _wait_for(port, SLOTS_IN_USE, 0) == 0 and metric(port, CANCELLED) == cancelled + 1


def test_shutdown_cancels_in_flight_requests() -> None:
    config = ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=1, threads=1),
                          model_name="tiny", shutdown_timeout=0.5)
    llm = SlowLLM(config.artifact, max_slots=1, threads=1)
    with ServerThread(config, llm) as running:
        conn = _open_stream(running.port, max_tokens=240)
        started = time.monotonic()
        running.stop()  # what SIGTERM does: graceful for 0.5 s, then in-flight requests are cancelled
        assert time.monotonic() - started < 10 and not running.thread.is_alive()
        rest = conn.response.read()  # type: ignore[attr-defined]
        assert rest.endswith(b"data: [DONE]\n\n") and b'"finish_reason": "cancelled"' in rest
    assert llm.engine.cache.num_active == 0 and not llm.has_work
