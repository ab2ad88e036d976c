"""Kinds and ranges of the manifest's fields, checked before anything uses them (manifest.parse_manifest).

A field of the wrong kind (``"eos_token_ids": "2"``, ``"files": [...]``, ``"model": null``) is refused with
one line naming it, at load time, instead of failing later inside a request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from graphopt.core.errors import ArtifactError

KV_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "int8", "uint8")


def _int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _optional_id(v: Any) -> bool:
    return v is None or _int(v)


def _ids(v: Any) -> bool:
    return isinstance(v, list) and all(_int(t) for t in v)


def _tensor(v: Any) -> bool:
    return isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("dtype"), str) \
        and isinstance(v.get("role"), str) and isinstance(v.get("shape"), list) \
        and all(_int(d) or isinstance(d, str) for d in v["shape"]) and (v.get("layer") is None or _int(v["layer"]))


def _tensors(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_tensor(t) for t in v)


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


Rule = tuple[str, Callable[[Any], bool]]
FIELDS: dict[str, Rule] = {
    "target": ("a string", lambda v: isinstance(v, str)),
    "model": ("an object", lambda v: isinstance(v, dict)),
    "model.num_layers": ("an integer >= 1", lambda v: _int(v, 1)),
    "model.num_heads": ("an integer >= 1", lambda v: _int(v, 1)),
    "model.num_kv_heads": ("an integer >= 1", lambda v: _int(v, 1)),
    "model.head_dim": ("an integer >= 1", lambda v: _int(v, 1)),
    "model.hidden_size": ("an integer >= 1", lambda v: _int(v, 1)),
    "model.vocab_size": ("an integer >= 1", lambda v: _int(v, 1)),
    "model.max_seq": ("an integer >= 1", lambda v: _int(v, 1)),
    "model.bos_token_id": ("null or a token id (integer >= 0)", _optional_id),
    "model.pad_token_id": ("null or a token id (integer >= 0)", _optional_id),
    "model.eos_token_ids": ("a list of token ids (integers >= 0)", _ids),
    "io": ("an object with 'inputs' and 'outputs'", lambda v: isinstance(v, dict)),
    "io.inputs": ("a non-empty list of {name, dtype, shape, role, layer?}", _tensors),
    "io.outputs": ("a non-empty list of {name, dtype, shape, role, layer?}", _tensors),
    "kv_cache": ("an object", lambda v: isinstance(v, dict)),
    "kv_cache.dtype": (f"one of {', '.join(KV_DTYPES)}", lambda v: v in KV_DTYPES),
    "kv_cache.aliases": ("an object of present -> past tensor names", _str_map),
}
def _objects(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def _optional_strs(v: Any) -> bool:
    return isinstance(v, dict) and all(x is None or isinstance(x, str) for x in v.values())


OPTIONAL = {"graphs": ("an object of use -> graph file", _str_map),
            "source": ("an object of strings or nulls", _optional_strs),
            "recipe": ("a string", lambda v: isinstance(v, str)),
            "precision": ("an object", lambda v: isinstance(v, dict)),
            "plugins": ("a list of objects", _objects),
            "optimization_profiles": ("a list of objects", _objects),
            "min_runtime": ("an object of runtime -> version", _str_map),
            "trt": ("an object", lambda v: isinstance(v, dict))}


def check_fields(raw: Any) -> None:
    """ArtifactError naming the first field of ``raw`` (the parsed manifest.json) of the wrong kind."""
    if not isinstance(raw, dict):
        _refuse("the manifest", "a JSON object", raw)
    for field, (kind, ok) in FIELDS.items():
        value, present = _lookup(raw, field)
        if not present or not ok(value):
            _refuse(field, kind, value if present else "nothing")
    for field, (kind, ok) in OPTIONAL.items():
        if raw.get(field) is not None and not ok(raw[field]):
            _refuse(field, kind, raw[field])
    model = raw["model"]
    if any(t >= model["vocab_size"] for t in model["eos_token_ids"]):
        _refuse("model.eos_token_ids", f"token ids below vocab_size {model['vocab_size']}", model["eos_token_ids"])


def _lookup(raw: dict[str, Any], field: str) -> tuple[Any, bool]:
    value: Any = raw
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None, False
        value = value[part]
    return value, True


def _refuse(field: str, kind: str, value: Any) -> None:
    raise ArtifactError(f"manifest.json: {field} must be {kind}, got {value!r:.80}; rebuild the artifact with "
                        "'graphopt build'")
