"""Grammar libraries behind one small interface: compile a :class:`GuidedSpec`, make a per-request matcher, fill
token bitmasks for a batch of matchers.

Two adapters, the same contract: ``llguidance`` (the runtime's default) and ``xgrammar`` (kept for the
comparison in ``scripts/bench_grammar_mask.py``; ``pip install xgrammar`` to run it). Measured at batch 8 on
SmolLM2 (figures in the README's serving section), xgrammar fills masks faster, but both cost about 1% of a
decode step, and xgrammar 0.2.9's JSON strings admit raw control characters (U+0000-U+001F but CR and LF),
which JSON forbids: sampled output then fails ``json.loads``. llguidance's do not; it also imports in
milliseconds with no dependencies (xgrammar: 2 s, torch and triton). Each is built
from the artifact's Hugging Face tokenizer, the model's vocabulary size (the logits' width) and its end
tokens. JSON grammars are compiled with fixed, compact whitespace: a grammar that allows free whitespace lets
a model pad forever and never close the document. A bitmask is int32 [rows, ceil(V / 32)], bit ``t % 32`` of
word ``t // 32`` set when token ``t`` is allowed (both libraries' layout).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from graphopt.core.errors import RequestError, RuntimeInputError

BACKENDS = ("llguidance", "xgrammar")
DEFAULT_BACKEND = "llguidance"
COMPACT = (",", ":")  # JSON separators, as llguidance writes them without flexible whitespace
COMPILE_CACHE = 64  # compiled grammars kept per backend (a server sees the same few schemas again and again)


def make_backend(name: str, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """A backend by name; RuntimeInputError naming the package to install when it is missing."""
    if name not in BACKENDS:
        raise RuntimeInputError(f"grammar backend {name!r} is unknown; use one of {list(BACKENDS)}")
    try:
        cls = LLGuidanceBackend if name == "llguidance" else XGrammarBackend
        return cls(tokenizer, vocab_size, [int(t) for t in eos_token_ids])
    except ImportError:
        raise RuntimeInputError(f"structured output needs the '{name}' package; pip install {name}") from None
    except (ValueError, TypeError, RuntimeError) as exc:  # e.g. a tokenizer without a byte-level/fallback decoder
        raise RuntimeInputError(f"structured output is unavailable: {name} cannot use this artifact's tokenizer "
                                f"({str(exc)[:160]}); send requests without response_format/guided_*") from None


def _choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of ``choices`` (metacharacters escaped for Rust/xgrammar regex syntax)."""
    special = set("\\^$.|?*+()[]{}/-")
    return "(" + "|".join("".join("\\" + c if c in special else c for c in s) for s in choices) + ")"


def _compile_error(spec: Any, exc: Exception) -> RequestError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return RequestError(f"'{spec.field}' cannot be compiled into a grammar: {reason}; fix the {spec.kind} "
                        "(see the README's structured output section for what is supported)", param=spec.field)


class LLGuidanceBackend:
    """llguidance: an Earley parser over a lexer, masks computed lazily per step (no per-schema precompute)."""

    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.numpy

        self._llg, self._np = llguidance, llguidance.numpy
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids or None)
        self.executor = llguidance.LLExecutor()
        self.compile = functools.lru_cache(COMPILE_CACHE)(self._compile)

    def _grammar(self, spec: Any) -> str:
        matcher, options = self._llg.LLMatcher, {"whitespace_flexible": False}
        if spec.kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, overrides=options)
        if spec.kind == "json_schema":
            return matcher.grammar_from_json_schema(spec.value, overrides=options)
        if spec.kind == "regex":
            return matcher.grammar_from_regex(spec.value)
        return matcher.grammar_from_regex(_choice_regex(json.loads(spec.value)))

    def _compile(self, spec: Any) -> str:
        try:
            grammar = self._grammar(spec)
            failed, messages = self._llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise _compile_error(spec, exc) from None
        if failed:
            raise _compile_error(spec, ValueError(messages[0] if messages else "invalid grammar"))
        return grammar

    def constraint(self, spec: Any) -> "LLGuidanceConstraint":
        return LLGuidanceConstraint(self._llg.LLMatcher(self.tokenizer, self.compile(spec), log_level=0), self)

    def fill(self, constraints: Sequence["LLGuidanceConstraint"]) -> np.ndarray:
        bitmask = self._np.allocate_token_bitmask(len(constraints), self.vocab_size)
        self._np.fill_next_token_bitmask_par(self.executor, [(c.matcher, i) for i, c in enumerate(constraints)],
                                             bitmask)
        return bitmask


class LLGuidanceConstraint:
    def __init__(self, matcher: Any, backend: LLGuidanceBackend) -> None:
        self.matcher, self.backend = matcher, backend

    def advance(self, token: int) -> bool:
        return bool(self.matcher.consume_token(int(token)))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class XGrammarBackend:
    """xgrammar: a pushdown automaton with a per-schema precomputed token cache (compile once, fast masks)."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        import torch
        import xgrammar

        self._xgr, self._torch = xgrammar, torch
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=eos_token_ids or None)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=1)
        self.vocab_size = vocab_size
        self.compile = functools.lru_cache(COMPILE_CACHE)(self._compile)

    def _compile(self, spec: Any) -> Any:
        compiler = self.compiler
        try:
            if spec.kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, separators=COMPACT)
            if spec.kind == "json_schema":
                return compiler.compile_json_schema(spec.value, any_whitespace=False, separators=COMPACT)
            regex = spec.value if spec.kind == "regex" else _choice_regex(json.loads(spec.value))
            return compiler.compile_regex(regex)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise _compile_error(spec, exc) from None

    def constraint(self, spec: Any) -> "XGrammarConstraint":
        return XGrammarConstraint(self._xgr.GrammarMatcher(self.compile(spec)), self)

    def fill(self, constraints: Sequence["XGrammarConstraint"]) -> np.ndarray:
        bitmask = self._xgr.allocate_token_bitmask(len(constraints), self.vocab_size)
        self.batch.batch_fill_next_token_bitmask([c.matcher for c in constraints], bitmask)
        return bitmask.numpy()


class XGrammarConstraint:
    def __init__(self, matcher: Any, backend: XGrammarBackend) -> None:
        self.matcher, self.backend = matcher, backend

    def advance(self, token: int) -> bool:
        return bool(self.matcher.accept_token(int(token)))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    @property
    def error(self) -> str | None:
        return None
