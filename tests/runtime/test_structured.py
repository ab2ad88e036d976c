"""Structured output without a model: request parsing (errors name the field), bitmask unpacking, masks in the sampler
for greedy and sampled rows, dead rows, drafts checked against the grammar, and the grammar library on a byte-level
tokenizer (compile errors, forced decoding to the end state). Deterministic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphopt.core.errors import RequestError, RuntimeInputError
from graphopt.runtime.grammar_backends import make_backend
from graphopt.runtime.sampler import SamplingParams, sample_rows
from graphopt.runtime.sequence import Sequence
from graphopt.runtime.structured import (GuidedSpec, constrain_drafts, grammar_accepts, parse_guided, token_masks,
                                         unpack_bitmask)
from serving_artifact import BYTE_VOCAB, byte_tokenizer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.mark.parametrize("body, kind, field", [
    ({"response_format": {"type": "json_object"}}, "json_object", "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}, "json_schema",
     "response_format.json_schema.schema"),
    ({"guided_json": json.dumps(SCHEMA)}, "json_schema", "guided_json"),
    ({"guided_regex": "[ab]+"}, "regex", "guided_regex"),
    ({"guided_choice": ["yes", "no"]}, "choice", "guided_choice"),
])
def test_parse_guided_forms(body: dict, kind: str, field: str) -> None:
    spec = parse_guided(body)
    assert (spec.kind, spec.field) == (kind, field)
    assert parse_guided({"response_format": {"type": "text"}}) is None and parse_guided({}) is None


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "[1, 2]"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
])
def test_parse_guided_errors_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_guided(body)
    assert caught.value.param == param


def test_unpack_bitmask() -> None:
    bitmask = np.zeros((2, 2), dtype=np.int32)
    bitmask[0, 0] = 0b101  # tokens 0 and 2
    bitmask[1, 1] = 1 << 3  # token 35
    bits = unpack_bitmask(bitmask, 40)
    assert np.flatnonzero(bits[0]).tolist() == [0, 2] and np.flatnonzero(bits[1]).tolist() == [35]


def test_sampler_masks_greedy_and_sampled_rows() -> None:
    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    before = logits.copy()
    allowed = np.zeros((4, 50), dtype=bool)
    allowed[:, [3, 7, 11]] = True
    allowed[3] = True  # an unconstrained row
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=1.0, top_k=2, top_p=0.9, seed=2), SamplingParams()]
    for _ in range(20):
        tokens = sample_rows(logits, params, [np.random.default_rng(i) for i in range(4)], None, allowed)
        assert set(tokens[:3].tolist()) <= {3, 7, 11}
    assert tokens[0] == [3, 7, 11][int(np.argmax(logits[0, [3, 7, 11]]))]
    assert tokens[3] == np.argmax(logits[3])
    np.testing.assert_array_equal(logits, before)  # masks work on a copy
    with pytest.raises(RuntimeInputError, match="allows no token"):
        sample_rows(logits, params, [np.random.default_rng(0)] * 4, None, np.zeros((4, 50), dtype=bool))


class FakeConstraint:
    def __init__(self, allowed: list[int], accepts: bool = True) -> None:
        self.allowed, self.accepts, self.error, self.is_terminated = allowed, accepts, None, False

    def advance(self, token: int) -> bool:
        return self.accepts


class FakeGrammars:
    class backend:  # noqa: N801 (the attribute Grammars exposes)
        @staticmethod
        def fill(constraints: list[FakeConstraint]) -> np.ndarray:
            bitmask = np.zeros((len(constraints), 1), dtype=np.int32)
            for row, c in enumerate(constraints):
                for token in c.allowed:
                    bitmask[row, 0] |= 1 << token
            return bitmask


def test_token_masks_finds_dead_rows(caplog: pytest.LogCaptureFixture) -> None:
    seqs = [Sequence([1], SamplingParams()) for _ in range(3)]
    assert token_masks(seqs, FakeGrammars(), 8) == (None, set())
    seqs[0].constraint, seqs[2].constraint = FakeConstraint([1, 4]), FakeConstraint([])
    allowed, dead = token_masks(seqs, FakeGrammars(), 8)
    assert dead == {2} and "admits no token" in caplog.text
    assert np.flatnonzero(allowed[0]).tolist() == [1, 4] and allowed[1].all() and allowed[2].all()
    seqs[0].constraint = FakeConstraint([1], accepts=False)
    assert not grammar_accepts(seqs[0], 1) and "refused token 1" in caplog.text


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    import transformers

    directory = tmp_path_factory.mktemp("bytes")
    byte_tokenizer(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer, make_backend("llguidance", tokenizer, BYTE_VOCAB, [tokenizer.eos_token_id])


def test_backend_refuses_a_bad_schema_naming_the_field(backend) -> None:
    _, grammars = backend
    with pytest.raises(RequestError) as caught:
        grammars.compile(GuidedSpec("json_schema", json.dumps({"type": "bogus"}), "guided_json"))
    assert caught.value.param == "guided_json" and "guided_json" in str(caught.value)


def test_backend_forced_decoding_reaches_the_end_state(backend) -> None:
    tokenizer, grammars = backend
    constraint = grammars.constraint(GuidedSpec("json_schema", json.dumps(SCHEMA)))
    for token in tokenizer('{"ok":true,"n":7}', add_special_tokens=False)["input_ids"]:
        allowed = unpack_bitmask(grammars.fill([constraint]), BYTE_VOCAB)[0]
        assert allowed[token] and constraint.advance(token)
    allowed = unpack_bitmask(grammars.fill([constraint]), BYTE_VOCAB)[0]
    assert np.flatnonzero(allowed).tolist() == [tokenizer.eos_token_id]  # complete: only the end token
    assert constraint.advance(tokenizer.eos_token_id) and constraint.is_terminated
    choice = grammars.constraint(GuidedSpec("choice", json.dumps(["a.b", "c"])))
    first = np.flatnonzero(unpack_bitmask(grammars.fill([choice]), BYTE_VOCAB)[0])
    assert sorted(tokenizer.decode([int(t)]) for t in first) == ["a", "c"]


def test_drafts_are_cut_where_the_grammar_refuses_one(backend) -> None:
    tokenizer, grammars = backend
    seq = Sequence([1], SamplingParams(), constraint=grammars.constraint(GuidedSpec("json_schema", json.dumps(SCHEMA))))
    good = tokenizer('{"ok":', add_special_tokens=False)["input_ids"]
    bad = tokenizer("x", add_special_tokens=False)["input_ids"]
    logits = np.zeros((len(good) + 3, BYTE_VOCAB), dtype=np.float32)
    drafts, masked = constrain_drafts(seq, good + bad + good[:1], logits)
    assert drafts == good and masked.shape == (len(good) + 1, BYTE_VOCAB)
    first_value = {tokenizer.decode([int(t)]) for t in np.flatnonzero(masked[-1] == 0)}
    assert first_value == {"t", "f"}  # true / false
    assert np.isneginf(masked[0]).sum() == BYTE_VOCAB - 1  # only '{' opens the object
    drafts, masked = constrain_drafts(seq, good, logits[: len(good) + 1])  # rolled back: the same answer again
    assert drafts == good and masked.shape == (len(good) + 1, BYTE_VOCAB)


def test_drafts_under_a_dead_grammar_are_all_cut() -> None:
    constraint = FakeConstraint([])
    constraint.backend, constraint.rollback = FakeGrammars.backend, lambda n: None
    seq = Sequence([1], SamplingParams(), constraint=constraint)
    logits = np.zeros((3, 8), dtype=np.float32)
    drafts, kept = constrain_drafts(seq, [1, 2], logits)
    assert drafts == [] and kept.shape == (1, 8)  # LLM._emit then refuses the target's token and stops
