"""TextStream: stop strings against a naive reference (hypothesis), held-back tails, and per-token work that
stays linear in the output whatever the stop strings (counted automaton steps, never timed)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.detokenizer import MAX_STOP_CHARS, MAX_STOP_STRINGS, StopMatcher, TextStream
from graphopt.runtime.sampler import SamplingParams


class CharTokenizer:
    """Token id = a character's code point; decoding joins them."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(i) for i in ids)


def _stream(text: str, stops: list[str]) -> tuple[str, str, bool]:
    """(concatenated take() deltas, final text, stopped), one token per character."""
    stream = TextStream(CharTokenizer(), [], stops)
    taken = []
    for char in text:
        stream.push(ord(char))
        delta = stream.take()
        taken.append(delta)
        seen = "".join(taken)
        for stop in stops:  # a client never sees the start of a stop string that may still complete
            assert stop not in seen
        if stream.stopped:
            break
    taken.append(stream.take(final=True))
    return "".join(taken), stream.text, stream.stopped


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Streaming semantics: stop at the first character that completes a stop string, cutting before the
    earliest stop string found in the text so far."""
    for end in range(1, len(text) + 1):
        hits = [text[:end].find(stop) for stop in stops if stop in text[:end]]
        if hits:
            return text[: min(hits)], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab ", max_size=60), st.lists(st.text(alphabet="ab ", min_size=1, max_size=6), max_size=4))
def test_stop_strings_match_a_naive_reference(text: str, stops: list[str]) -> None:
    expected, stopped = _reference(text, stops)
    streamed, final, was_stopped = _stream(text, stops)
    assert (streamed, final, was_stopped) == (expected, expected, stopped)


def test_matcher_work_is_linear_in_the_text_not_the_stop_length() -> None:
    stops = [("a" * (MAX_STOP_CHARS - 1)) + chr(ord("b") + i) for i in range(MAX_STOP_STRINGS)]  # worst case
    matcher = StopMatcher(stops)
    for _ in range(2000):
        assert matcher.feed("aaaa") is None
    assert matcher.fed == 8000 and matcher.pending == MAX_STOP_CHARS - 1
    assert matcher.steps <= 2 * matcher.fed * len(stops)  # the old tail scan: ~fed/4 x longest² copies


def test_held_back_tail_is_bounded_by_the_longest_stop_prefix() -> None:
    stream = TextStream(CharTokenizer(), [], ["abc"])
    for char in "xxab":
        stream.push(ord(char))
    assert stream.take() == "xx" and stream.take(final=True) == "ab"


def test_stop_caps_are_enforced() -> None:
    with pytest.raises(RuntimeInputError, match="stop"):
        SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1))
    with pytest.raises(RuntimeInputError, match="stop"):
        SamplingParams(stop=["y" * (MAX_STOP_CHARS + 1)])
    assert SamplingParams(stop=["y" * MAX_STOP_CHARS] * MAX_STOP_STRINGS).stop[0] == "y" * MAX_STOP_CHARS
