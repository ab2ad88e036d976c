"""Incremental detokenization with stop strings, one :class:`TextStream` per request.

Each new token is decoded together with a few tokens before it, and only the text past what those
tokens already decoded to is appended, so multi-byte characters split over tokens ("\\ufffd" while
incomplete) and SentencePiece leading spaces come out right without decoding the whole output each step.

Stop strings are matched on the text: on a match the text is cut before the stop string and the
stream is done. While streaming, a tail that could still grow into a stop string is held back
(``pending``), so a client never sees part of a stop string.

Cost per token is bounded whatever the output length: each stop string runs a Knuth-Morris-Pratt automaton
over the new characters only (its state is the length of the longest prefix of the stop string that ends
the text, which is also how much to hold back), so the whole output costs at most 2 x characters x stop
strings automaton steps (``steps`` counts them). Requests may give at most ``MAX_STOP_STRINGS`` stop strings
of at most ``MAX_STOP_CHARS`` characters each (SamplingParams refuses more).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_CONTEXT = 4  # prompt tokens decoded before the first output token (leading-space rules)
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_HELD_TOKENS = 8  # tokens that may still end in an incomplete character before "\ufffd" is emitted as is


class StopMatcher:
    """Finds the first occurrence of any stop string in text fed piece by piece; linear in what it is fed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._fail = [_failure(stop) for stop in self.stops]
        self._state = [0] * len(self.stops)
        self.fed = 0  # characters fed so far
        self.steps = 0  # automaton transitions so far (≤ 2 x fed x len(stops))

    def feed(self, piece: str) -> int | None:
        """Feed the next ``piece`` of text; the start offset of the earliest stop string it completes, or None."""
        best = None
        for index, stop in enumerate(self.stops):
            state, fail = self._state[index], self._fail[index]
            for position, char in enumerate(piece):
                while state and stop[state] != char:
                    state = fail[state - 1]
                    self.steps += 1
                state += stop[state] == char
                self.steps += 1
                if state == len(stop):
                    start = self.fed + position + 1 - len(stop)
                    best = start if best is None else min(best, start)
                    break
            self._state[index] = state
        self.fed += len(piece)
        return best

    @property
    def pending(self) -> int:
        """Length of the longest tail of the text fed so far that is a proper prefix of a stop string."""
        return max(self._state, default=0)


def _failure(stop: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper border of stop[:i + 1]."""
    fail = [0] * len(stop)
    border = 0
    for i in range(1, len(stop)):
        while border and stop[i] != stop[border]:
            border = fail[border - 1]
        border += stop[i] == stop[border]
        fail[i] = border
    return fail


class TextStream:
    """The text of one request's generated tokens, cut at the first stop string."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0  # self._ids[_prefix:_read] decoded to text we already have
        self._read = len(self._ids)
        self.matcher = StopMatcher(stop)
        self._parts: list[str] = []  # the text, appended piece by piece (joined only when read whole)
        self._length = 0
        self._unsent = ""  # the text past what take() returned
        self.stopped = False  # a stop string matched; ``text`` ends before it

    @property
    def text(self) -> str:
        return "".join(self._parts)[: self._length]

    def push(self, token_id: int) -> None:
        """Add one generated token (ignored once a stop string matched)."""
        if self.stopped:
            return
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        held = len(self._ids) - self._read
        if len(after) <= len(before) or (after.endswith("\ufffd") and held < MAX_HELD_TOKENS):
            return  # an incomplete character: wait for the next token
        self._prefix, self._read = self._read, len(self._ids)
        self._append(after[len(before):])

    def _append(self, piece: str) -> None:
        start = self._length
        self._parts.append(piece)
        self._length += len(piece)
        self._unsent += piece
        match = self.matcher.feed(piece)
        if match is not None:  # the held-back tail covers the stop string's start: it is still unsent
            cut = start + len(piece) - match
            self._unsent = self._unsent[: max(0, len(self._unsent) - cut)]
            self._length = match
            self.stopped = True

    def take(self, final: bool = False) -> str:
        """Text not yet taken; holds back a tail that may become a stop string unless ``final``."""
        keep = 0 if final or self.stopped else min(self.matcher.pending, len(self._unsent))
        delta = self._unsent[: len(self._unsent) - keep]
        self._unsent = self._unsent[len(self._unsent) - keep:]
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""
