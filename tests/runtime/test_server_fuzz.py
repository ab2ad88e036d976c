"""A bounded fuzz of the HTTP API (hypothesis, derandomized) against a real server on 127.0.0.1: no body,
however odd, gets a 5xx, and a known greedy request still answers the same afterwards."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphopt.runtime.openai_protocol import CHAT, COMPLETIONS
from graphopt.runtime.config import LLMConfig
from graphopt.runtime.server import ServerConfig
from serving_artifact import ServerThread, tiny_artifact

GREEDY = {"model": "tiny", "prompt": "w4 w5 w6", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40) | st.sampled_from(["w4 w5", "tiny", "user", "text"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                           "content": st.text(alphabet="w4567 ", max_size=20) | JSON}), max_size=3)


def _bodies(rules: dict) -> st.SearchStrategy:
    """Objects over the endpoint's own field names (so validators are reached), any JSON as values."""
    small = {"max_tokens": st.integers(-2, 40), "max_completion_tokens": st.integers(-2, 40),
             "prompt": st.text(alphabet="w4567 ", max_size=30) | st.lists(st.integers(-3, 120), max_size=5) | JSON,
             "messages": MESSAGES | JSON, "temperature": st.floats(-1, 3) | JSON, "stream": st.booleans() | JSON}
    fields = {name: small.get(name, JSON) for name in rules} | {"unknown": JSON}
    return st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))


NEAR_VALID = {  # values around each field's valid range, so many requests run and the edges are probed
    "temperature": st.floats(0, 2.5) | st.sampled_from([0, 1e-39, 5e-324]), "top_p": st.floats(0, 1.2),
    "top_k": st.integers(-2, 120), "min_p": st.floats(-0.1, 1.1), "repetition_penalty": st.floats(0.005, 200),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3),
    "seed": st.integers(-(2**70), 2**70), "stop": st.text(max_size=4) | st.lists(st.text(max_size=300), max_size=18),
    "stream": st.booleans(), "logprobs": st.integers(-1, 6), "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(-1, 200), max_size=3), "max_tokens": st.integers(0, 300),
    "prompt": st.text(alphabet="w4567 ", min_size=1, max_size=40) | st.lists(st.integers(0, 95), min_size=1),
}
VALID_BASE = {"model": "tiny", "prompt": "w4 w5", "max_tokens": 4}
NEAR = st.dictionaries(st.sampled_from(sorted(NEAR_VALID)), st.none(), max_size=3).flatmap(
    lambda keys: st.fixed_dictionaries({k: NEAR_VALID[k] for k in keys})).map(lambda extra: VALID_BASE | extra)

REQUESTS = st.one_of(
    st.tuples(st.just("/v1/completions"), NEAR.map(lambda b: json.dumps(b).encode())),
    st.tuples(st.just("/v1/completions"), _bodies(COMPLETIONS).map(lambda b: json.dumps(b).encode())),
    st.tuples(st.just("/v1/chat/completions"), _bodies(CHAT).map(lambda b: json.dumps(b).encode())),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.binary(max_size=64)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), JSON.map(lambda v: json.dumps(v).encode())),
)


@pytest.fixture(scope="module")
def server():
    config = ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=4, max_queue=8, threads=1),
                          model_name="tiny", max_body_bytes=16 * 1024)
    with ServerThread(config) as running:
        yield running


def _post(port: int, path: str, raw: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_fuzzed_requests_never_get_a_5xx_and_greedy_still_answers(server) -> None:
    status, before = _post(server.port, "/v1/completions", json.dumps(GREEDY).encode())
    assert status == 200
    seen: dict[int, int] = {}

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(REQUESTS)
    def fuzz(request: tuple[str, bytes]) -> None:
        path, raw = request
        code, data = _post(server.port, path, raw)
        seen[code] = seen.get(code, 0) + 1
        assert code < 500, (path, raw[:300], data[:300])

    fuzz()
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both valid and refused bodies were reached
    status, after = _post(server.port, "/v1/completions", json.dumps(GREEDY).encode())
    assert status == 200 and json.loads(after)["choices"] == json.loads(before)["choices"]
