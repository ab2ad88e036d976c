"""OpenAI request validation: JSON body → prompts (token ids) + :class:`SamplingParams`.

Every field is checked against a table (kind and range); a bad one raises :class:`RequestError` naming it
(HTTP 400, OpenAI's ``param``). Unknown fields are refused, as OpenAI does. Extensions as in vLLM:
``top_k`` (-1 or 0 = off), ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, and the
structured-output fields ``guided_json``, ``guided_regex``, ``guided_choice`` (``response_format`` is accepted
on both endpoints; structured.py checks these fields' contents).

Sampling fields a request leaves out default to the artifact's ``generation_config.json`` (as in vLLM): with
``do_sample`` false or absent, greedy (temperature 0); with ``do_sample`` true, its temperature, top_p, top_k,
min_p and repetition_penalty, each where given (else OpenAI's defaults: temperature 1, top_p 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphopt.core.errors import ArtifactError, RequestError, RuntimeInputError
from graphopt.runtime.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS
from graphopt.runtime.sampler import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, SamplingParams
from graphopt.runtime.structured import GuidedSpec, parse_guided

MAX_N = 64  # choices per prompt (the queue bounds prompts x n as well)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
ROLES = ("system", "developer", "user", "assistant", "tool")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _stop(v: Any) -> bool:
    items = [v] if isinstance(v, str) else v
    return isinstance(items, list) and len(items) <= MAX_STOP_STRINGS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in items)


def _ids(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_int(t) and t >= 0 for t in v)


Rule = tuple[str, Callable[[Any], bool]]
COMMON: dict[str, Rule] = {
    "model": ("a string", lambda v: isinstance(v, str)),
    "max_tokens": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "temperature": ("a number in [0, 2]", lambda v: _num(v) and 0 <= v <= 2),
    "top_p": ("a number in (0, 1]", lambda v: _num(v) and 0 < v <= 1),
    "n": (f"an integer in 1..{MAX_N} (choices per prompt)", lambda v: _int(v) and 1 <= v <= MAX_N),
    "stream": ("a boolean", lambda v: isinstance(v, bool)),
    "stream_options": ("an object like {\"include_usage\": true}",
                       lambda v: isinstance(v, dict) and set(v) <= {"include_usage"}
                       and isinstance(v.get("include_usage", False), bool)),
    "stop": (f"a non-empty string of at most {MAX_STOP_CHARS} characters or a list of up to {MAX_STOP_STRINGS} "
             "of them", _stop),
    "seed": ("an integer", _int),
    "presence_penalty": ("a number in [-2, 2]", lambda v: _num(v) and -2 <= v <= 2),
    "frequency_penalty": ("a number in [-2, 2]", lambda v: _num(v) and -2 <= v <= 2),
    "logit_bias": ("empty (logit_bias is not supported)", lambda v: v == {}),
    "user": ("a string", lambda v: isinstance(v, str)),
    "metadata": ("an object", lambda v: isinstance(v, dict)),
    "store": ("false", lambda v: v is False),
    "service_tier": ("a string", lambda v: isinstance(v, str)),
    "top_k": ("an integer >= -1 (-1 or 0 = off)", lambda v: _int(v) and v >= -1),
    "min_p": ("a number in [0, 1]", lambda v: _num(v) and 0 <= v <= 1),
    "repetition_penalty": (f"a number in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}]",
                           lambda v: _num(v) and MIN_REPETITION_PENALTY <= v <= MAX_REPETITION_PENALTY),
    "ignore_eos": ("a boolean", lambda v: isinstance(v, bool)),
    "stop_token_ids": ("a list of token ids", lambda v: isinstance(v, list) and all(_int(t) and t >= 0 for t in v)),
    "response_format": ("an object like {\"type\": \"json_object\"}", lambda v: isinstance(v, dict)),
    "guided_json": ("a JSON schema (an object or its JSON text)", lambda v: isinstance(v, (dict, str))),
    "guided_regex": ("a string", lambda v: isinstance(v, str)),
    "guided_choice": ("a list of strings", lambda v: isinstance(v, list)),
}
COMPLETIONS: dict[str, Rule] = {
    **COMMON,
    "prompt": ("a string, a list of strings, a list of token ids or a list of such lists",
               lambda v: (isinstance(v, str) and bool(v)) or _ids(v) or (
                   isinstance(v, list) and bool(v) and all((isinstance(p, str) and p) or _ids(p) for p in v))),
    "logprobs": ("an integer in 0..5", lambda v: _int(v) and 0 <= v <= 5),
    "echo": ("false (echo is not supported)", lambda v: v is False),
    "best_of": (f"an integer in 1..{MAX_N}, at least n", lambda v: _int(v) and 1 <= v <= MAX_N),
    "suffix": ("null (suffix is not supported)", lambda v: False),
}
CHAT: dict[str, Rule] = {
    **COMMON,
    "messages": ("a non-empty list of {role, content} messages", lambda v: isinstance(v, list) and bool(v)),
    "max_completion_tokens": ("an integer >= 1", lambda v: _int(v) and v >= 1),
    "logprobs": ("a boolean", lambda v: isinstance(v, bool)),
    "top_logprobs": ("an integer in 0..20", lambda v: _int(v) and 0 <= v <= 20),
    "tools": ("empty (tools are not supported)", lambda v: v == []),
    "tool_choice": ("\"none\"", lambda v: v == "none"),
    "parallel_tool_calls": ("a boolean", lambda v: isinstance(v, bool)),
}


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    """A validated request: one or more prompts (token ids) sharing one set of sampling params."""

    model: str | None
    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token, None = off
    n: int = 1  # choices per prompt: prompt i's are choices i*n .. i*n+n-1
    best_of: int = 1  # completions generated per prompt; the n with the highest log-probability are returned

    @property
    def copies(self) -> int:
        """Engine requests per prompt."""
        return max(self.n, self.best_of)

    def requests(self) -> tuple[list[list[int]], list[SamplingParams]]:
        """``copies`` engine requests per prompt (prompt i's are i*copies ..). A seeded request's copies get seeds
        seed, seed+1, ... (as vLLM's), so they differ; the copies share the prompt's KV through the prefix
        cache. With best_of > n each token's log-probability is computed, to rank the copies."""
        base = dataclasses.replace(self.params, logprobs=0) if self.best_of > self.n and \
            self.params.logprobs is None else self.params
        params = [base if base.seed is None or j == 0 else dataclasses.replace(base, seed=(base.seed + j) % 2**63)
                  for j in range(self.copies)]
        return [p for p in self.prompts for _ in range(self.copies)], params * len(self.prompts)


def validate(body: Any, rules: dict[str, Rule], required: str) -> dict[str, Any]:
    """Check every field of ``body`` against ``rules``; null means "default"."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", param="body")
    for name, value in body.items():
        if name not in rules:
            raise RequestError(f"unrecognized request argument supplied: {name}", param=name)
        description, ok = rules[name]
        if value is not None and not ok(value):
            raise RequestError(f"'{name}' must be {description}; got {value!r:.80}", param=name)
    if body.get(required) is None:
        raise RequestError(f"'{required}' is required", param=required)
    return {name: value for name, value in body.items() if value is not None}


def completion_prompts(body: dict[str, Any], tokenizer: Any) -> list[list[int]]:
    prompt = body["prompt"]
    items = [prompt] if isinstance(prompt, str) or _ids(prompt) else prompt
    return [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in items]


def chat_prompt(body: dict[str, Any], tokenizer: Any) -> list[int]:
    """The chat template applied to ``messages`` (content: a string or a list of text parts)."""
    messages = [_message(m, i) for i, m in enumerate(body["messages"])]
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # jinja raises TemplateError (e.g. "roles must alternate") and others
        raise RequestError(f"the chat template refused these messages: {exc}", param="messages") from None
    return list(ids)


def _message(message: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise RequestError(f"{where} must be an object with 'role' one of {', '.join(ROLES)}", param=where)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}}",
                               param=f"{where}.content")
        content = "".join(p["text"] for p in content)
    if content is None and message["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    return {"role": message["role"], "content": content}


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(artifact: Path, source: str = "auto") -> dict[str, Any]:
    """The sampling defaults ``--generation-config`` names: "auto" (the artifact's generation_config.json),
    "vllm" or "none" (none: the API's own, temperature 1.0 as OpenAI's), or a folder with a generation_config.json."""
    if source == "auto":
        return request_defaults(artifact)
    if source in ("vllm", "none"):
        return {}
    folder = Path(source)
    if not (folder / "generation_config.json").is_file():
        raise RuntimeInputError(f"--generation-config {source!r}: no generation_config.json there; use auto, vllm, "
                                "none, or a folder that holds one")
    return request_defaults(folder)


def request_defaults(artifact: Path) -> dict[str, Any]:
    """Sampling defaults from ``artifact/generation_config.json`` (see the module docstring); ArtifactError for a
    value the API itself would refuse."""
    path = artifact / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({str(exc)[:80]}); rebuild the artifact") from None
    if not isinstance(config, dict) or not config.get("do_sample"):
        return {"temperature": 0.0}
    defaults = {name: config[name] for name in SAMPLING_DEFAULTS if config.get(name) is not None}
    for name, value in defaults.items():
        description, ok = COMMON[name]
        if not ok(value):
            raise ArtifactError(f"{path}: {name} must be {description}, got {value!r:.80}; fix the file or rebuild "
                                "the artifact")
    return defaults


def sampling_params(body: dict[str, Any], max_tokens: int, logprobs: int | None,
                    defaults: dict[str, Any] | None = None) -> SamplingParams:
    body = {**(defaults or {}), **body}
    stop = body.get("stop", ())
    top_k = body.get("top_k", 0)
    guided = parse_guided(body)  # RequestError naming the field; outside the try, which would lose it
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
            top_k=max(top_k, 0), min_p=body.get("min_p", 0.0),
            repetition_penalty=body.get("repetition_penalty", 1.0),
            presence_penalty=body.get("presence_penalty", 0.0), frequency_penalty=body.get("frequency_penalty", 0.0),
            seed=body["seed"] % 2**63 if "seed" in body else None, stop=(stop,) if isinstance(stop, str) else stop,
            stop_token_ids=body.get("stop_token_ids", ()), ignore_eos=body.get("ignore_eos", False), logprobs=logprobs,
            guided=guided)
    except RuntimeInputError as exc:
        raise RequestError(str(exc)) from None


def fit_max_tokens(prompts: list[list[int]], requested: int | None, default: int | None, max_seq: int,
                   prompt_field: str) -> int:
    """max_tokens for these prompts: the request's (checked against the context) or a default clamped to it."""
    longest = max(len(p) for p in prompts)
    if longest >= max_seq:
        raise RequestError(f"this model's maximum context length is {max_seq} tokens, but the prompt has "
                           f"{longest}; shorten the prompt", param=prompt_field, code="context_length_exceeded")
    room = max_seq - longest
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise RequestError(f"this model's maximum context length is {max_seq} tokens; the prompt has {longest} "
                           f"and max_tokens asks for {requested} more; lower max_tokens to at most {room}",
                           param="max_tokens", code="context_length_exceeded")
    return requested


def _with_grammar(params: SamplingParams, check: Callable[[GuidedSpec], None] | None) -> SamplingParams:
    """``check`` compiles the request's grammar now (cached): one the library refuses is a 400 naming its field."""
    if params.guided is not None and check is not None:
        check(params.guided)
    return params


def parse_completion(body: Any, tokenizer: Any, max_seq: int, vocab_size: int, defaults: dict[str, Any] | None = None,
                     check_grammar: Callable[[GuidedSpec], None] | None = None) -> ParsedRequest:
    body = validate(body, COMPLETIONS, "prompt")
    prompts = completion_prompts(body, tokenizer)
    if any(not p or max(p) >= vocab_size for p in prompts):
        raise RequestError(f"prompt token ids must be in 0..{vocab_size - 1} (and prompts non-empty)", param="prompt")
    max_tokens = fit_max_tokens(prompts, body.get("max_tokens"), COMPLETIONS_DEFAULT_MAX_TOKENS, max_seq, "prompt")
    logprobs = body.get("logprobs")
    n, best_of = body.get("n", 1), body.get("best_of", body.get("n", 1))
    if best_of < n or (best_of > n and body.get("stream", False)):
        raise RequestError(f"best_of {best_of} must be at least n {n}, and equal to it when streaming", param="best_of")
    params = _with_grammar(sampling_params(body, max_tokens, logprobs, defaults), check_grammar)
    return ParsedRequest(body.get("model"), prompts, params, body.get("stream", False),
                         body.get("stream_options", {}).get("include_usage", False),
                         logprobs, n, best_of)


def parse_chat(body: Any, tokenizer: Any, max_seq: int, defaults: dict[str, Any] | None = None,
               check_grammar: Callable[[GuidedSpec], None] | None = None) -> ParsedRequest:
    body = validate(body, CHAT, "messages")
    prompt = chat_prompt(body, tokenizer)
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = fit_max_tokens([prompt], requested, None, max_seq, "messages")
    logprobs = body.get("top_logprobs", 0) if body.get("logprobs") else None
    params = _with_grammar(sampling_params(body, max_tokens, logprobs, defaults), check_grammar)
    return ParsedRequest(body.get("model"), [prompt], params, body.get("stream", False),
                         body.get("stream_options", {}).get("include_usage", False),
                         logprobs, body.get("n", 1))
