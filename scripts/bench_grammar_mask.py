"""Benchmark (not a test): grammar mask cost per token, xgrammar vs llguidance, against the decode step.

    .venv/bin/python scripts/bench_grammar_mask.py ARTIFACT [--batch 8] [--repeats 5] [--no-decode]

Both libraries get the artifact's tokenizer and the same JSON schema (compact whitespace, as the server
compiles it). ``batch`` matchers are driven through ``batch`` different schema-valid documents (forced
decoding: each step fills every row's bitmask, applies it to [batch, V] float32 logits as the sampler does,
then feeds each row its document's next token). Per library: tokenizer set-up and schema compile time
(once); the median over ``repeats`` interleaved rounds of the whole run's time per token (fill + apply +
advance, divided by the tokens emitted); whether its JSON strings admit a raw control character (invalid
JSON). Then the engine's decode step at ``batch`` rows, timed in the same run, and each library's cost as a
share of it.
Needs both libraries: ``pip install xgrammar llguidance``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from graphopt.runtime.grammar_backends import make_backend
from graphopt.runtime.structured import GuidedSpec, apply_bitmask, unpack_bitmask
from graphopt.runtime.tokenizer import load_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "maxLength": 60},
        "city": {"enum": ["Paris", "Berlin", "Madrid", "Rome", "Lisbon"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
    },
    "required": ["name", "age", "email", "city", "active", "tags"],
    "additionalProperties": False,
}
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar".split()


def documents(batch: int, seed: int = 0) -> list[str]:
    """``batch`` schema-valid documents, compact separators (what the compiled grammar admits)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(batch):
        name = " ".join(rng.choice(WORDS).title() for _ in range(2))
        doc = {"name": name, "age": rng.randrange(151), "email": f"{name.replace(' ', '.').lower()}@example.org",
               "city": rng.choice(SCHEMA["properties"]["city"]["enum"]), "active": rng.random() < 0.5,
               "tags": rng.sample(WORDS, rng.randrange(6))}
        docs.append(json.dumps(doc, separators=(",", ":")))
    return docs


def run_once(backend, spec: GuidedSpec, token_docs: list[list[int]], vocab: int) -> tuple[np.ndarray, int]:
    """Seconds spent in [fill, apply, advance] over the whole forced decode, and tokens emitted."""
    constraints = [backend.constraint(spec) for _ in token_docs]
    logits = np.random.default_rng(0).standard_normal((len(token_docs), vocab)).astype(np.float32)
    spent, emitted = np.zeros(3), 0
    for position in range(max(map(len, token_docs))):
        rows = [row for row, doc in enumerate(token_docs) if position < len(doc)]
        t0 = time.perf_counter()
        bitmask = backend.fill([constraints[row] for row in rows])
        t1 = time.perf_counter()
        apply_bitmask(logits[: len(rows)], bitmask)
        t2 = time.perf_counter()
        for row in rows:
            if not constraints[row].advance(token_docs[row][position]):
                raise SystemExit(f"{backend.name}: document {row} rejected at token {position}")
        spent += (t1 - t0, t2 - t1, time.perf_counter() - t2)
        emitted += len(rows)
    return spent, emitted


def admits_control_bytes(backend, spec: GuidedSpec, tokenizer) -> bool:
    """Inside a JSON string (after '{"name":"'), may the grammar emit a raw U+0001? JSON forbids it."""
    constraint = backend.constraint(spec)
    for token in tokenizer('{"name":"', add_special_tokens=False)["input_ids"]:
        constraint.advance(token)
    control = tokenizer("\x01", add_special_tokens=False)["input_ids"][0]
    return bool(unpack_bitmask(backend.fill([constraint]), control + 1)[0, control])


def decode_step_ms(artifact: str, batch: int, repeats: int) -> float:
    from graphopt.runtime.engine_api import open_engine

    engine = open_engine(artifact, max_slots=batch, max_seq=512)
    slots = [engine.cache.allocate() for _ in range(batch)]
    engine.prefill([[engine.pad_token_id] * 64] * batch, slots)
    times = []
    for _ in range(repeats * 4 + 1):
        began = time.perf_counter()
        engine.decode([0] * batch)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-decode", action="store_true", help="skip timing the engine's decode step")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.artifact)
    vocab = json.loads(open(f"{args.artifact}/manifest.json").read())["model"]["vocab_size"]
    docs = documents(args.batch)
    token_docs = [list(tokenizer(doc, add_special_tokens=False)["input_ids"]) for doc in docs]
    spec = GuidedSpec("json_schema", json.dumps(SCHEMA))
    backends, notes = {}, {}
    for name in ("xgrammar", "llguidance"):
        began = time.perf_counter()
        backends[name] = backend = make_backend(name, tokenizer, vocab, eos_token_ids=(tokenizer.eos_token_id,))
        setup = time.perf_counter() - began
        began = time.perf_counter()
        backend.compile(spec)
        notes[name] = (setup, time.perf_counter() - began, admits_control_bytes(backend, spec, tokenizer))
    runs: dict[str, list[np.ndarray]] = {name: [] for name in backends}
    for _ in range(args.repeats + 1):  # interleaved rounds; the first warms up and is dropped
        for name, backend in backends.items():
            spent, emitted = run_once(backend, spec, [d + [tokenizer.eos_token_id] for d in token_docs], vocab)
            runs[name].append(spent / emitted * 1e3)
    results = {}
    for name, (setup, compiled, control) in notes.items():
        kept = sorted(runs[name][1:], key=lambda r: r.sum())
        fill, apply, advance = kept[len(kept) // 2]
        results[name] = total = fill + apply + advance
        print(f"{name:10s} tokenizer set-up {setup * 1e3:6.1f} ms, compile {compiled * 1e3:5.1f} ms; "
              f"mask cost per token at batch {args.batch}: {total:.4f} ms (fill {fill:.4f} + apply {apply:.4f} + "
              f"advance {advance:.4f}; runs {kept[0].sum():.4f}..{kept[-1].sum():.4f}); raw control characters "
              f"in JSON strings: {'ADMITTED (invalid JSON)' if control else 'refused'}")
    if not args.no_decode:
        step = decode_step_ms(args.artifact, args.batch, args.repeats)
        print(f"decode step at batch {args.batch}: {step:.2f} ms ({step / args.batch:.2f} ms per token)")
        for name, cost in results.items():
            print(f"{name:10s} mask work per step / decode step at batch {args.batch}: "
                  f"{cost * args.batch / step * 100:.2f}%")


if __name__ == "__main__":
    main()
