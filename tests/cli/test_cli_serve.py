"""``graphopt serve`` as a subprocess: the openai client over a real socket, then a clean SIGTERM."""

from __future__ import annotations

import pytest

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai

from serving_artifact import tiny_artifact


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _graphopt() -> list[str]:
    script = Path(sys.executable).parent / "graphopt"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from graphopt.cli.main import main; main()"]


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("graphopt serve did not become healthy")


@pytest.mark.integration
def test_serve_answers_the_openai_client_and_stops_on_sigterm() -> None:
    port = _free_port()
    command = _graphopt() + ["serve", str(tiny_artifact()), "--port", str(port), "--api-key", "sk-cli",
                             "--max-slots", "4", "--threads", "1", "--model-name", "tiny", "--shutdown-timeout", "20"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_healthy(port, process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-cli", max_retries=0, timeout=30)
        done = client.completions.create(model="tiny", prompt="w4 w5", max_tokens=5, temperature=0)
        assert done.choices[0].finish_reason in ("length", "stop") and done.choices[0].text
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w4"}],
                                                max_tokens=240, stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        rest: list = []
        reader = threading.Thread(target=lambda: rest.extend(stream))
        reader.start()
        process.send_signal(signal.SIGTERM)  # the in-flight stream is allowed to finish (shutdown timeout 20 s)
        assert process.wait(timeout=30) == 0
        reader.join(10)
        assert rest and rest[-1].choices[0].finish_reason == "length"
        assert b"Application shutdown complete" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_a_folder_that_is_not_an_artifact(tmp_path) -> None:
    result = subprocess.run(_graphopt() + ["serve", str(tmp_path)], capture_output=True, timeout=60)
    assert result.returncode == 2 and b"is not a graphopt artifact" in result.stderr
