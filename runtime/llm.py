"""``LLM(artifact).generate(prompts, params)``: in-flight batching over one engine.

The loop, one engine call per step::

    step = scheduler.schedule()                 # free cancelled slots; admit; a prefill or a decode batch
    logits = run(step)                          # engine.prefill(chunks, slots) | engine.decode(last tokens)
    rows = scheduler.complete(step)             # which rows now sample (prompt done, or decoding)
    outputs = postprocess(step, rows, logits)   # sample, detokenize, stop checks
    scheduler.release(finished)                 # finished requests free their slot in this same step

With speculative decoding (``LLMConfig(speculative=SpecConfig(...))``), a decode step the scheduler marks as speculating
runs through :class:`~graphopt.runtime.speculative.Speculator` and a row may emit several tokens at once.

Requests may be added and aborted from other threads (the async server does): the scheduler is touched
only under ``self._lock``, which is not held while the engine runs.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.detokenizer import TextStream
from graphopt.runtime.engine_api import open_engine
from graphopt.runtime.penalties import TokenLogprob, token_logprobs
from graphopt.runtime.sampler import SamplingParams, sample_rows
from graphopt.runtime.scheduler import Scheduler, SchedulerConfig, Step, StepKind
from graphopt.runtime.sequence import Sequence
from graphopt.runtime.config import LLMConfig
from graphopt.runtime.speculative import Speculator, SpecResult
from graphopt.runtime.structured import Grammars, grammar_accepts, token_masks
from graphopt.runtime.tokenizer import load_tokenizer

Prompt = str | list[int]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: new tokens and text, and how it ended if it did."""

    request_id: str
    token_ids: list[int]  # new this step (0 or 1 token; up to k+1 with speculative decoding)
    text: str  # new text this step (may lag tokens: held back at a partial stop string or character)
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # "stop" | "length" | "cancelled" on the request's last output
    seq: Sequence = dataclasses.field(repr=False)
    num_generated: int = 0  # tokens generated so far, this output's included
    time: float = 0.0  # when the step made it (perf_counter)
    num_drafted: int = 0  # speculative drafts verified this step for this request
    num_accepted: int = 0  # of which accepted

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob]
    ttft_s: float
    latency_s: float
    speculative: dict[str, float] | None = None  # acceptance statistics when the request speculated


class LLM:
    """An artifact, its tokenizer, a slot cache, a scheduler and a sampler.

    ``LLM(artifact, config)`` or ``LLM(artifact, max_slots=2, ...)`` (keywords of :class:`LLMConfig`, over
    ``config`` when both are given). ``tokenizer`` replaces the artifact's own (tests, a caller that has one).
    """

    def __init__(self, artifact: str | Path, config: LLMConfig | None = None, *, tokenizer: Any = None,
                 **settings: Any) -> None:
        self.artifact = Path(artifact)
        self.config = config = (config or LLMConfig()).with_settings(**settings)
        speculative = config.speculative
        # a draft and its target take turns: spinning idle threads of one would slow the other (engine.py)
        spin = {"spinning": False} if speculative is not None and speculative.method == "draft" else {}
        self.engine = open_engine(self.artifact, max_slots=config.max_slots, max_seq=config.max_seq,
                                  threads=config.threads, **spin)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.artifact)
        self.grammars = Grammars(self.tokenizer, self.engine.vocab_size, self.engine.eos_token_ids)  # structured output
        self.speculator = None if speculative is None else Speculator(speculative, self.engine, self.artifact,
                                                                      config.threads)
        spec = self.speculator
        self.scheduler = Scheduler(self.engine.cache, SchedulerConfig(config.max_batch_tokens, config.max_queue),
                                   planner=spec.plan if spec else None, mirrors=tuple(spec.mirrors) if spec else (),
                                   prefix_cache=config.prefix_cache and self.engine.capabilities.row_copy)
        self._requests: dict[str, tuple[Sequence, TextStream]] = {}
        self._lock = threading.Lock()

    @property
    def max_seq(self) -> int:
        return self.engine.max_seq

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- requests ----------------------------------------------------------------------------------------
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt`` (text through the tokenizer, or ids checked against the vocabulary)."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        ids = list(prompt)
        if not ids or not all(isinstance(t, (int, np.integer)) and 0 <= t < self.engine.vocab_size for t in ids):
            raise RuntimeInputError(f"prompt token ids must be a non-empty list of integers in "
                                    f"0..{self.engine.vocab_size - 1}")
        return [int(t) for t in ids]

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Queue a request; raises RuntimeInputError (does not fit) or OverloadedError (queue full)."""
        ids = self.encode(prompt)
        seq = Sequence(ids, params) if request_id is None else Sequence(ids, params, request_id=request_id)
        if params.guided is not None:  # structured output: RequestError here for a grammar the library refuses
            seq.constraint = self.grammars.constraint(params.guided)
        stream = TextStream(self.tokenizer, ids, params.stop)
        with self._lock:
            if seq.request_id in self._requests:
                raise RuntimeInputError(f"request id {seq.request_id!r} is already in use; pass a unique id")
            self.scheduler.add(seq)
            self._requests[seq.request_id] = (seq, stream)
        return seq

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request; its slot is freed at the next step. Returns it, or None if unknown or already done."""
        with self._lock:
            entry = self._requests.pop(request_id, None)
            return entry[0] if entry is not None and self.scheduler.abort(entry[0]) else None

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)

    # ---- the loop ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine call and return what it produced (empty when there is nothing to do)."""
        with self._lock:
            step = self.scheduler.schedule()
        if step is None:
            return []
        logits = self._run(step)
        with self._lock:
            if isinstance(logits, SpecResult):
                accepted = {row: a.num_accepted for row, a in logits.accepted.items()}
                rows = self.scheduler.complete(step, accepted)
                outputs = self._postprocess_spec(step, rows, logits)
            else:
                rows = self.scheduler.complete(step)
                outputs = self._postprocess(step, rows, logits)
            self.scheduler.release([out.seq for out in outputs if out.finished])
        return outputs

    def _run(self, step: Step) -> np.ndarray | SpecResult:
        if step.kind is StepKind.PREFILL:
            return self.engine.prefill(step.chunks, step.slots)
        if step.speculating:
            return self.speculator.run(step.seqs, step.num_speculative)
        began = time.perf_counter()
        logits = self.engine.decode([chunk[0] for chunk in step.chunks])
        if self.speculator is not None:  # plain decode steps keep the cost model current
            self.speculator.costs.observe("decode", len(step.seqs), time.perf_counter() - began)
        return logits

    def _postprocess_spec(self, step: Step, rows: list[int], result: SpecResult) -> list[RequestOutput]:
        """Plain rows sample as usual; speculating rows emit their accepted drafts and the target's token."""
        index = {row: i for i, row in enumerate(result.plain_rows)}
        plain = [row for row in rows if row in index]
        outputs = self._postprocess(step, plain, result.logits[[index[row] for row in plain]]) if plain else []
        now = time.perf_counter()
        for row in (row for row in rows if row in result.accepted):
            seq, accepted = step.seqs[row], result.accepted[row]
            logprobs = seq.params.logprobs
            lps = token_logprobs(result.target_logits[row][: len(accepted.tokens)], np.asarray(accepted.tokens),
                                 [logprobs] * len(accepted.tokens)) if logprobs is not None else []
            outputs.append(self._emit(seq, accepted.tokens, lps, now, accepted.num_proposed, accepted.num_accepted))
        return outputs

    def _postprocess(self, step: Step, rows: list[int], logits: np.ndarray) -> list[RequestOutput]:
        """``logits`` has one row per row of ``step``, or exactly one per entry of ``rows`` (in that order)."""
        if not rows:
            return []
        seqs = [step.seqs[row] for row in rows]
        logits = logits if len(rows) == logits.shape[0] else logits[rows]
        params = [seq.params for seq in seqs]
        history = [(seq.prompt_ids, seq.output_ids) for seq in seqs] if any(p.penalised for p in params) else None
        allowed, dead = token_masks(seqs, self.grammars, self.engine.vocab_size)  # structured output
        tokens = sample_rows(logits, params, [seq.generator for seq in seqs], history, allowed)
        wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
        logprobs = dict(zip(wanted, token_logprobs(logits[wanted], tokens[wanted],
                                                   [params[r].logprobs for r in wanted]))) if wanted else {}
        now = time.perf_counter()
        return [self._emit(seq, [] if row in dead else [token], [logprobs[row]] if row in logprobs else [], now)
                for row, (seq, token) in enumerate(zip(seqs, tokens.tolist()))]

    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob], now: float, drafted: int = 0,
              accepted: int = 0) -> RequestOutput:
        """Append ``tokens`` one by one until the request finishes (the rest of a speculative round is dropped).
        No tokens: the request's grammar admits none (structured.token_masks logged why), so it stops."""
        stream = self._requests[seq.request_id][1]
        emitted = []
        seq.finish_reason = None if tokens else "stop"
        for token in tokens:
            if seq.constraint is not None and not grammar_accepts(seq, token):  # structured output (logged)
                seq.finish_reason = "stop"
                break
            seq.append(token, now)
            stream.push(token)
            emitted.append(token)
            seq.finish_reason = self._finish_reason(seq, token, stream)
            if seq.finish_reason is not None:
                break
        if seq.finish_reason is not None:
            del self._requests[seq.request_id]
        text = stream.take(final=seq.finish_reason is not None)
        return RequestOutput(seq.request_id, emitted, text, logprobs[: len(emitted)], seq.finish_reason, seq,
                             len(seq.output_ids), now, drafted, accepted)

    def _finish_reason(self, seq: Sequence, token: int, stream: TextStream) -> str | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.engine.eos_token_ids):
            return "stop"
        if stream.stopped or (seq.constraint is not None and seq.constraint.is_terminated):
            return "stop"
        if len(seq.output_ids) >= params.max_new_tokens:
            return "length"
        return None

    # ---- offline use -------------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Run every prompt to completion with in-flight batching; results in prompt order."""
        prompts = [prompts] if isinstance(prompts, str) or _is_id_list(prompts) else list(prompts)
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise RuntimeInputError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        pending = list(zip(prompts, plist))[::-1]
        seqs: list[Sequence] = []
        parts: dict[str, list[RequestOutput]] = {}
        try:
            while pending or self.has_work:
                while pending and len(self.scheduler.waiting) < self.scheduler.config.max_queue:
                    seqs.append(self.add_request(*pending.pop()))
                for out in self.step():
                    parts.setdefault(out.request_id, []).append(out)
        except BaseException:
            for seq in seqs:  # a refused prompt (or Ctrl-C) leaves nothing of this call behind
                self.abort(seq.request_id)
            self.step()
            raise
        return [collect_completion(seq, parts.get(seq.request_id, [])) for seq in seqs]


def _is_id_list(prompts: Any) -> bool:
    return isinstance(prompts, list) and bool(prompts) and all(isinstance(t, (int, np.integer)) for t in prompts)


def collect_completion(seq: Sequence, outputs: list[RequestOutput]) -> Completion:
    end = seq.last_token_time or seq.arrival_time
    return Completion(seq.request_id, "".join(o.text for o in outputs), list(seq.output_ids),
                      seq.finish_reason or "cancelled", seq.num_prompt,
                      [lp for o in outputs for lp in o.logprobs],
                      (seq.first_token_time or end) - seq.arrival_time, end - seq.arrival_time,
                      seq.spec.as_dict() if seq.spec.rounds else None)
