"""Incremental detokenization with stop strings, one :class:`TextStream` per request (DESIGN §8).

Each new token is decoded together with a few tokens before it, and only the text past what those
tokens already decoded to is appended, so multi-byte characters split over tokens ("\\ufffd" while
incomplete) and SentencePiece leading spaces come out right without decoding the whole output each step.

Stop strings are matched on the text: on a match the text is cut before the stop string and the
stream is done. While streaming, a tail that could still grow into a stop string is held back
(``pending``), so a client never sees part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_CONTEXT = 4  # prompt tokens decoded before the first output token (leading-space rules)


class TextStream:
    """The text of one request's generated tokens, cut at the first stop string."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0  # self._ids[_prefix:_read] decoded to text we already have
        self._read = len(self._ids)
        self._stops = tuple(stop)
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stopped = False  # a stop string matched; ``text`` ends before it
        self._sent = 0

    def push(self, token_id: int) -> None:
        """Add one generated token (ignored once a stop string matched)."""
        if self.stopped:
            return
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        start = max(0, len(self.text) - self._longest + 1)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        self._match_stop(start)

    def take(self, final: bool = False) -> str:
        """Text not yet taken; holds back a tail that may become a stop string unless ``final``."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._pending()
        delta = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _match_stop(self, start: int) -> None:
        hits = [index for index in (self.text.find(stop, start) for stop in self._stops) if index >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _pending(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for size in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
