"""One request's state as it moves through the runtime: waiting → prefill → decode → finished.

A :class:`Sequence` is pure bookkeeping (no model, no tokenizer): its prompt and generated token ids,
how many of its tokens sit in its KV slot, the slot, its sampling parameters and random stream, and
how it ended. The scheduler moves it between states; the LLM appends tokens and decides when it stops.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from typing import Any

import numpy as np

from graphopt.runtime.sampler import SamplingParams, make_generator

_ids = itertools.count()


@dataclasses.dataclass
class SpecState:
    """One request's speculative decoding: its current draft length and acceptance statistics.

    ``rounds`` verification calls proposed ``proposed`` drafts, of which ``accepted`` were kept; each round also
    emits one target token, so a round yields ``accepted / rounds + 1`` tokens on average (``mean_accepted_length``,
    as vLLM reports it). ``beta_sum / beta_count`` estimates Leviathan's α (spec_accept.py). ``alpha`` is the
    running estimate the adaptive policy uses; ``resume_at`` is the output length at which an "off" request probes again.
    """

    k: int = 0
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    beta_sum: float = 0.0
    beta_count: int = 0
    alpha: float | None = None
    resume_at: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.accepted / self.rounds + 1.0 if self.rounds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"rounds": self.rounds, "proposed": self.proposed, "accepted": self.accepted,
                "beta_sum": round(self.beta_sum, 4),
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_accepted_length": round(self.mean_accepted_length, 4)}


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILL = "prefill"  # holds a slot, prompt partly in the cache (chunked prefill)
    DECODE = "decode"  # prompt cached, generating one token per decode step
    FINISHED = "finished"  # slot released


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request's tokens and progress. ``num_cached`` tokens of ``prompt_ids + output_ids`` are in slot ``slot``."""

    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = dataclasses.field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1
    num_cached: int = 0
    num_reused: int = 0  # prompt tokens whose KV came from the prefix cache
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None
    spec: SpecState = dataclasses.field(default_factory=SpecState, repr=False)
    constraint: Any = dataclasses.field(default=None, repr=False)  # structured output's matcher (structured.py)
    generator: np.random.Generator = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.generator = make_generator(self.params)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in the cache."""
        return max(0, self.num_prompt - self.num_cached)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def num_tokens(self) -> int:
        return self.num_prompt + len(self.output_ids)

    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def next_chunk(self, budget: int) -> list[int]:
        """The next ≤ ``budget`` prompt tokens to prefill."""
        return self.prompt_ids[self.num_cached:self.num_cached + budget]

    def append(self, token: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now
        self.output_ids.append(int(token))
