"""Structured output: a request's grammar (JSON object, JSON schema, regex, choice), its per-request
constraint, and the token masks the sampler applies.

    request field                                  GuidedSpec(kind, value)
    response_format {"type": "json_object"}        json_object, ""
    response_format {"type": "json_schema",        json_schema, the schema as JSON text
                     "json_schema": {"schema": …}}
    guided_json (vLLM: a schema, object or text)   json_schema
    guided_regex (vLLM)                            regex
    guided_choice (vLLM: a list of strings)        choice, the list as JSON text

At most one per request. :class:`Grammars` compiles a spec (cached) through the grammar library
(``grammar_backends.py``) built lazily from the artifact's tokenizer; a spec the library refuses is a
:class:`RequestError` naming the field (HTTP 400). Each constrained :class:`Sequence` holds a constraint
(``advance(token)``, ``rollback(n)``, ``is_terminated``, ``error``) that the LLM advances as it emits each token.
Per decode step :func:`token_masks` fills the bitmasks of the constrained rows and unpacks them to ``allowed``
[B, V] bool for ``sample_rows`` (greedy and sampled rows alike); a row whose grammar admits no token is returned as dead
(the LLM ends it with finish_reason "stop", logged), never sampled from NaNs. A grammar in its end state allows only
the end tokens; the request stops with "stop" once the grammar is terminated. Speculative rows go through
:func:`constrain_drafts`: drafts are cut where the grammar refuses one, and the target's distributions at the kept
positions are masked, so acceptance (greedy or rejection sampling) emits what the masked target would, as for
unconstrained requests.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.core.errors import RequestError

log = logging.getLogger(__name__)
KINDS = ("json_object", "json_schema", "regex", "choice")
GUIDED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")


@dataclasses.dataclass(frozen=True)
class GuidedSpec:
    """What a request's output must match: ``kind`` in KINDS, ``value`` its text; ``field`` names the request
    field it came from (for errors; not part of equality, so one compiled grammar serves every field)."""

    kind: str
    value: str = ""
    field: str = dataclasses.field(default="response_format", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS or not isinstance(self.value, str):
            raise RequestError(f"'{self.field}': guided output kind {self.kind!r} is unknown; use one of "
                               f"{list(KINDS)} with a text value", param=self.field)


def parse_guided(body: dict[str, Any]) -> GuidedSpec | None:
    """The request's grammar from ``response_format`` or vLLM's ``guided_*`` fields (None: free text)."""
    given = [name for name in GUIDED_FIELDS if body.get(name) is not None
             and not (name == "response_format" and body[name] == {"type": "text"})]
    if len(given) > 1:
        raise RequestError(f"'{given[1]}' and '{given[0]}' both constrain the output; send only one of them",
                           param=given[1])
    if not given:
        return None
    name, value = given[0], body[given[0]]
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        return GuidedSpec("json_schema", _schema_text(value, name), name)
    if name == "guided_regex":
        if not isinstance(value, str) or not value:
            raise RequestError("'guided_regex' must be a non-empty string (a regular expression)", param=name)
        return GuidedSpec("regex", value, name)
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise RequestError("'guided_choice' must be a non-empty list of non-empty strings", param=name)
    return GuidedSpec("choice", json.dumps(value), name)


def _response_format(value: Any) -> GuidedSpec:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object" and set(value) == {"type"}:
        return GuidedSpec("json_object", "", "response_format")
    if kind != "json_schema":
        raise RequestError("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                           "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}; "
                           f"got {value!r:.80}", param="response_format")
    inner = value.get("json_schema")
    known = {"name", "schema", "strict", "description"}
    if not isinstance(inner, dict) or not isinstance(inner.get("schema"), dict) \
            or not isinstance(inner.get("name", ""), str) or not set(inner) <= known:
        raise RequestError("'response_format.json_schema' must be an object with 'schema' (a JSON schema object) "
                           "and optionally 'name', 'description', 'strict'", param="response_format.json_schema")
    return GuidedSpec("json_schema", _schema_text(inner["schema"], "response_format.json_schema.schema"),
                      "response_format.json_schema.schema")


def _schema_text(schema: Any, field: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise RequestError(f"'{field}' is not valid JSON; send a JSON schema object", param=field) from None
    if not isinstance(schema, dict):
        raise RequestError(f"'{field}' must be a JSON schema object", param=field)
    return json.dumps(schema)  # key order kept: properties are generated in schema order


class Grammars:
    """Compiles specs and makes constraints for one tokenizer and vocabulary; the library loads on first use."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], backend: str | None = None):
        self._args = (tokenizer, vocab_size, tuple(eos_token_ids))
        self._name = backend
        self._backend: Any = None
        self._lock = threading.Lock()

    @property
    def backend(self) -> Any:
        with self._lock:  # the server compiles on its tokenizer thread while the engine thread may add requests
            if self._backend is None:
                from graphopt.runtime.grammar_backends import DEFAULT_BACKEND, make_backend

                self._backend = make_backend(self._name or DEFAULT_BACKEND, *self._args)
            return self._backend

    def check(self, spec: GuidedSpec) -> None:
        """Compile ``spec`` now (cached): RequestError naming its field when the library refuses it."""
        self.backend.compile(spec)

    def constraint(self, spec: GuidedSpec) -> Any:
        return self.backend.constraint(spec)


def unpack_bitmask(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32 [n, W] bitmask → bool [n, V] (bit t % 32 of word t // 32: token t allowed)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """A copy of ``logits`` [n, V] with the tokens ``bitmask`` forbids at -inf."""
    return np.where(unpack_bitmask(bitmask, logits.shape[1]), logits, np.float32(-np.inf))


def grammar_accepts(seq: Any, token: int) -> bool:
    """Advance ``seq``'s grammar by ``token``; False (logged) when it refuses it, which the mask prevents unless
    the library's mask and its parser disagree (seen with unusual tokenizers)."""
    if seq.constraint.advance(token):
        return True
    log.warning("request %s: the grammar refused token %d (%.200s); ending it with finish_reason 'stop'",
                seq.request_id, token, seq.constraint.error or "not allowed here")
    return False


def constrain_drafts(seq: Any, drafts: list[int], logits: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Speculative decoding under a grammar: the longest prefix of ``drafts`` the grammar accepts, and the target's
    ``logits`` [k+1, V] cut to that prefix plus one and masked position by position, so greedy or rejection-sampled
    acceptance emits exactly what the masked target would. The matcher is advanced over the drafts, then rolled
    back (LLM._emit advances it over what is accepted)."""
    constraint, masks, consumed = seq.constraint, [], 0
    for token in drafts:
        masks.append(constraint.backend.fill([constraint])[0])
        if not _allows(masks[-1], token) or not constraint.advance(token):
            break
        consumed += 1
    else:
        masks.append(constraint.backend.fill([constraint])[0])
    constraint.rollback(consumed)
    admits = unpack_bitmask(np.stack(masks), logits.shape[1])  # [consumed + 1, V]
    empty = np.flatnonzero(~admits.any(axis=1))
    kept = consumed if not empty.size else int(empty[0]) - 1
    if kept < 0:  # the grammar admits no token now: LLM._emit refuses the target's token and stops the request
        return [], logits[:1]
    return list(drafts[:kept]), np.where(admits[:kept + 1], logits[:kept + 1], np.float32(-np.inf))


def _allows(bitmask_row: np.ndarray, token: int) -> bool:
    return bool((int(bitmask_row[token // 32]) >> (token % 32)) & 1)


def token_masks(seqs: Sequence[Any], grammars: Grammars, vocab_size: int) -> tuple[np.ndarray | None, set[int]]:
    """``allowed`` [B, V] for ``sample_rows`` (None when no row is constrained) and the dead rows: those whose
    grammar admits no token (their ``allowed`` row is left all True; the caller must not emit their token)."""
    rows = [row for row, seq in enumerate(seqs) if seq.constraint is not None]
    if not rows:
        return None, set()
    bits = unpack_bitmask(grammars.backend.fill([seqs[row].constraint for row in rows]), vocab_size)
    allowed = np.ones((len(seqs), vocab_size), dtype=bool)
    dead = set()
    for row, row_bits in zip(rows, bits):
        if row_bits.any():
            allowed[row] = row_bits
            continue
        dead.add(row)
        seq = seqs[row]
        reason = seq.constraint.error or "the grammar admits no token of this vocabulary here"
        log.warning("request %s: %s (after %d tokens); ending it with finish_reason 'stop'", seq.request_id, reason,
                    len(seq.output_ids))
    return allowed, dead
