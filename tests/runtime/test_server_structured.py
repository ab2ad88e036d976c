"""Structured output through the real ``openai`` client against the server, on a tiny random llama with a
byte-level tokenizer: random logits, yet every sampled output parses and validates because of the mask. Also
json_object, guided_choice/guided_regex, 400s naming the field, and a grammar the vocabulary cannot spell
(ends with "stop", no hang)."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest

from graphopt.runtime.config import LLMConfig
from graphopt.runtime.llm import LLM
from graphopt.runtime.sampler import SamplingParams
from graphopt.runtime.server import ServerConfig
from graphopt.runtime.structured import GuidedSpec
from serving_artifact import ServerThread, byte_artifact
from tiny_models import tiny_tokenizer

# bounded: every string, number and array has a size limit, so the grammar closes within max_tokens
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "ok", "color", "count", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
MAX_TOKENS = 160  # 8 characters as \uXXXX escapes are 48 tokens; the rest is under 80


@pytest.fixture(scope="module")
def client():
    config = ServerConfig(byte_artifact(), llm=LLMConfig(max_slots=8, threads=1), model_name="bytes")
    with ServerThread(config) as running:
        yield openai.OpenAI(base_url=running.base_url, api_key="none", max_retries=0, timeout=60)


def _request(client: openai.OpenAI, seed: int) -> tuple[str, str]:
    if seed % 2:
        out = client.chat.completions.create(model="bytes", messages=[{"role": "user", "content": f"record {seed}"}],
                                             max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                             response_format=RESPONSE_FORMAT)
        return out.choices[0].message.content, out.choices[0].finish_reason
    out = client.completions.create(model="bytes", prompt=f"record {seed}:", max_tokens=MAX_TOKENS, temperature=1.0,
                                    seed=seed, extra_body={"response_format": RESPONSE_FORMAT})
    return out.choices[0].text, out.choices[0].finish_reason


def test_twenty_seeded_sampled_requests_validate(client: openai.OpenAI) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # batched: masks for several rows per step
        results = list(pool.map(lambda seed: _request(client, seed), range(20)))
    for text, finish_reason in results:
        assert finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in results}) > 10  # sampled, not one forced string


def test_json_object_choice_and_regex(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="bytes", messages=[{"role": "user", "content": "hi"}], max_tokens=200,
                                         temperature=0, response_format={"type": "json_object"})
    choice = out.choices[0]
    if choice.finish_reason == "stop":  # an object with free keys may outgrow max_tokens: then "length", honestly
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    stream = client.chat.completions.create(model="bytes", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            max_tokens=MAX_TOKENS, temperature=1.0, seed=7,
                                            response_format=RESPONSE_FORMAT)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), SCHEMA)
    for seed in range(3):  # n = 2: each choice has its own matcher
        picked = client.completions.create(model="bytes", prompt="pick", max_tokens=10, temperature=1.0, seed=seed,
                                           n=2, extra_body={"guided_choice": ["yes", "no", "maybe"]}).choices
        assert [(c.text in ("yes", "no", "maybe"), c.finish_reason) for c in picked] == [(True, "stop")] * 2
    matched = client.completions.create(model="bytes", prompt="id", max_tokens=20, temperature=1.0, seed=1,
                                        extra_body={"guided_regex": "[a-c]{3}-[0-9]{2}"}).choices[0]
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", matched.text) and matched.finish_reason == "stop"


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_grammars_are_400_naming_the_field(client: openai.OpenAI, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="bytes", prompt="x", max_tokens=4, extra_body=extra)
    assert caught.value.body["param"] == param, caught.value.body


def test_a_grammar_the_vocabulary_cannot_spell_stops(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    import transformers

    from tokenizers import decoders

    tiny_tokenizer(tmp_path)  # word-level: 'w4'... and no '{'
    words = transformers.AutoTokenizer.from_pretrained(tmp_path)
    words.backend_tokenizer.decoder = decoders.ByteLevel()  # how the grammar library learns each token's bytes
    llm = LLM(byte_artifact(), max_slots=2, threads=1, tokenizer=words)
    [done] = llm.generate([[5, 6]], SamplingParams(max_new_tokens=8, guided=GuidedSpec("json_object")))
    assert (done.finish_reason, done.token_ids) == ("stop", [])
    assert "ending it with finish_reason 'stop'" in caplog.text  # the mask is empty, or the parser refuses


def test_speculating_under_a_grammar_decodes_as_without() -> None:
    from graphopt.runtime.speculative import SpecConfig

    prompts = [[40, 41, 42, 43] * 6, [34, 110, 97, 109, 101, 34] * 4]  # n-gram lookup finds drafts in them
    schema = GuidedSpec("json_schema", json.dumps(SCHEMA))
    greedy = SamplingParams(max_new_tokens=MAX_TOKENS, guided=schema)
    plain = LLM(byte_artifact(), max_slots=4, threads=1).generate(prompts, greedy)
    llm = LLM(byte_artifact(), max_slots=4, threads=1,
              speculative=SpecConfig(method="ngram", num_speculative_tokens=3, adaptive=False))
    spec = llm.generate(prompts, greedy)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]  # masked greedy, token for token
    assert all(c.speculative is not None and c.speculative["rounds"] > 0 for c in spec)
    sampled = llm.generate(prompts * 2, [SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                                        guided=schema) for seed in range(4)])
    for completion in sampled:
        assert completion.finish_reason == "stop"
        jsonschema.validate(json.loads(completion.text), SCHEMA)
