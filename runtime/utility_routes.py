"""The utility endpoints a vLLM user reaches for, and the server's periodic throughput line.

    POST /tokenize     {"prompt": str} or {"messages": [...]} (+ "model", "add_special_tokens")
                       → {"tokens": [...], "count": n, "max_model_len": m}   (messages: the chat template applied)
    POST /detokenize   {"tokens": [ids]} (+ "model")  → {"prompt": str}
    GET  /version      → {"version": graphopt's version}

Bad input is a 400 naming the field, as on the completion endpoints; a wrong "model" is a 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from graphopt import __version__
from graphopt.core.errors import RequestError
from graphopt.runtime.openai_protocol import chat_prompt

log = logging.getLogger("graphopt.runtime.server")
TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def _checked(body: Any, fields: set[str], model_name: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", param="body")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise RequestError(f"unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"the model '{model}' does not exist; this server serves '{model_name}'", param="model",
                           status=404, code="model_not_found")
    return body


def tokenize(body: Any, tokenizer: Any, model_name: str, max_seq: int) -> dict[str, Any]:
    body = _checked(body, TOKENIZE_FIELDS, model_name)
    if ("prompt" in body) == ("messages" in body):
        raise RequestError("send exactly one of 'prompt' (a string) or 'messages' (a chat)", param="prompt")
    if "messages" in body:
        if not isinstance(body["messages"], list) or not body["messages"]:
            raise RequestError("'messages' must be a non-empty list of messages", param="messages")
        ids = chat_prompt(body, tokenizer)
    else:
        if not isinstance(body["prompt"], str):
            raise RequestError("'prompt' must be a string", param="prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise RequestError("'add_special_tokens' must be true or false", param="add_special_tokens")
        ids = list(tokenizer(body["prompt"], add_special_tokens=special)["input_ids"])
    return {"tokens": [int(t) for t in ids], "count": len(ids), "max_model_len": max_seq}


def detokenize(body: Any, tokenizer: Any, model_name: str, vocab_size: int) -> dict[str, Any]:
    body = _checked(body, DETOKENIZE_FIELDS, model_name)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                                               for t in tokens):
        raise RequestError(f"'tokens' must be a list of token ids in 0..{vocab_size - 1}", param="tokens")
    return {"prompt": tokenizer.decode(tokens)}


def version() -> dict[str, str]:
    return {"version": __version__}


class ThroughputLog:
    """One line every ``interval`` seconds while requests are served: tokens/s since the last line, slots, queue."""

    def __init__(self, metrics, slots_in_use, queue_length, max_slots: int, interval: float = 10.0) -> None:
        self.metrics, self.slots_in_use, self.queue_length = metrics, slots_in_use, queue_length
        self.max_slots, self.interval = max_slots, interval
        self._last = (time.monotonic(), 0, 0)

    def line(self) -> str | None:
        """The line for the time since the previous call; None when nothing was served in between."""
        now, prompt, generated = time.monotonic(), self.metrics.total_prompt_tokens, self.metrics.total_generation_tokens
        then, prompt_before, generated_before = self._last
        self._last = (now, prompt, generated)
        if prompt == prompt_before and generated == generated_before and not self.slots_in_use():
            return None
        seconds = max(now - then, 1e-9)
        return (f"throughput: prompt {(prompt - prompt_before) / seconds:.1f} tok/s, generation "
                f"{(generated - generated_before) / seconds:.1f} tok/s, slots {self.slots_in_use()}/{self.max_slots}, "
                f"waiting {self.queue_length()}")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            line = self.line()
            if line is not None:
                log.info(line)
