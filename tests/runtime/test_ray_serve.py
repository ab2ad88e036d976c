"""Ray Serve scale-out: 2 replicas on a local loopback Ray cluster answer the openai client (needs graphopt[ray])."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import socket

import openai
import pytest

from graphopt.runtime.config import LLMConfig
from graphopt.runtime.server import ServerConfig
from serving_artifact import tiny_artifact

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray Serve is not installed (pip install 'graphopt[ray]'); ~20 s when it is")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.integration
def test_two_replicas_answer_the_openai_client() -> None:
    from graphopt.runtime import ray_serve  # imports ray only inside start(), after choosing loopback

    port = _free_port()
    config = ServerConfig(tiny_artifact(), llm=LLMConfig(max_slots=4), port=port, api_key="sk-ray", model_name="tiny")
    ray_serve.start(config, replicas=2)
    try:
        from ray import serve

        replicas = serve.status().applications[ray_serve.APP_NAME].deployments[ray_serve.APP_NAME].replica_states
        assert replicas == {"RUNNING": 2}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-ray", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]

        def complete(_: int) -> str:
            return client.completions.create(model="tiny", prompt="w4 w5", max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(complete, range(16)))
        assert len(set(texts)) == 1 and len(texts[0].split()) == 6  # every replica runs the same greedy model
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w4"}],
                                                     max_tokens=4, stream=True, extra_body={"ignore_eos": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
    finally:
        ray_serve.stop()
