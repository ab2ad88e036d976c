"""OpenAI response bodies and stream chunks for /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence
from typing import Any

from graphopt.runtime.llm import Completion, RequestOutput
from graphopt.runtime.penalties import TokenLogprob
from graphopt.runtime.sequence import Sequence as SeqState


@dataclasses.dataclass(frozen=True)
class PromptUsage:
    """A request's prompt tokens, each prompt counted once whatever ``n`` is, and how many of them no choice had
    to compute (their KV came from the prefix cache): OpenAI's ``prompt_tokens_details.cached_tokens``."""

    tokens: int
    cached: int


def prompt_usage(parsed: Any, seqs: Sequence[SeqState]) -> PromptUsage:
    """``seqs``: the finished choices of ``parsed`` (a ParsedRequest), in choice order (prompt i: i*n..i*n+n-1)."""
    tokens = sum(len(prompt) for prompt in parsed.prompts)
    by_prompt: dict[int, list[int]] = {}
    for index, seq in enumerate(seqs):
        by_prompt.setdefault(index // parsed.copies, []).append(seq.num_reused)
    return PromptUsage(tokens, sum(min(reused) for reused in by_prompt.values()))


def best_of(results: Sequence[Completion], copies: int, n: int) -> list[Completion]:
    """Of each prompt's ``copies`` results (consecutive), the ``n`` of highest total log-probability, in order."""
    kept = []
    for first in range(0, len(results), copies):
        group = list(results[first:first + copies])
        ranked = sorted(range(copies), key=lambda i: -sum(lp.logprob for lp in group[i].logprobs))
        kept += [group[i] for i in sorted(ranked[:n])]
    return kept


def usage(prompt: PromptUsage, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt.tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt.tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": prompt.cached}}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Responses:
    """Builds one request's response (or its chunks): ids, timestamps, logprobs in the endpoint's format."""

    def __init__(self, chat: bool, model: str, tokenizer: Any, logprobs: int | None) -> None:
        self.chat = chat
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}

    # ---- whole responses ---------------------------------------------------------------------------------
    def final(self, results: Sequence[Completion], prompt: PromptUsage, copies: int = 1, n: int = 1) -> dict[str, Any]:
        """``results``: ``copies`` per prompt, in order; with ``n`` below that, each prompt's ``n`` of highest
        total log-probability are the choices (best_of). Usage counts every generated token."""
        kept = best_of(results, copies, n) if copies > n else results
        choices = [self._choice(index, r.text, r.finish_reason, r.logprobs, final=True) for index, r in enumerate(kept)]
        body = self._envelope("chat.completion" if self.chat else "text_completion", choices)
        body["usage"] = usage(prompt, sum(len(r.token_ids) for r in results))
        return body

    # ---- stream chunks -----------------------------------------------------------------------------------
    def role_chunk(self, index: int) -> dict[str, Any] | None:
        """Chat streams open with the assistant role; completions need no opening chunk."""
        if not self.chat:
            return None
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return self._envelope("chat.completion.chunk", [choice])

    def chunk(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        """A chunk with this output's text (None when it adds nothing: text held back, no logprobs, not done)."""
        if not out.text and not out.finished and not (self.logprobs is not None and out.logprobs):
            return None
        choice = self._choice(index, out.text, out.finish_reason, out.logprobs, final=False)
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, prompt: PromptUsage, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(prompt, completion_tokens)
        return body

    # ---- pieces ------------------------------------------------------------------------------------------
    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob],
                final: bool) -> dict[str, Any]:
        formatted = self._logprobs(index, logprobs) if self.logprobs is not None else None
        if not self.chat:
            return {"index": index, "text": text, "logprobs": formatted, "finish_reason": finish_reason}
        key, content = ("message", {"role": "assistant", "content": text}) if final else ("delta", {"content": text})
        if not final and finish_reason is not None and not text:
            content = {}
        return {"index": index, key: content, "logprobs": formatted, "finish_reason": finish_reason}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, index: int, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {"content": [{**self._entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [self._entry(i, v) for i, v in lp.top]} for lp in logprobs]}
        tokens = [self._token(lp.token_id) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{self._token(i): v for i, v in lp.top} for lp in logprobs], "text_offset": offsets}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
