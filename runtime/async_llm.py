"""Async streaming over :class:`~graphopt.runtime.llm.LLM`: one engine thread, many asyncio consumers.

    asyncio side                               engine thread
    stream(prompt) → llm.add_request ──wake──► while work: outputs = llm.step()
    queue.get() ◄── call_soon_threadsafe ───── dispatch(outputs) to each request's asyncio.Queue
    consumer gone (disconnect / cancel) → llm.abort(id): its slot is freed at the next step

ONNX Runtime releases the GIL while it runs, so the event loop keeps serving HTTP during a step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Protocol

from graphopt.core.errors import GraphoptError, OverloadedError
from graphopt.runtime.llm import LLM, Completion, Prompt, RequestOutput, collect_completion
from graphopt.runtime.sampler import SamplingParams

log = logging.getLogger(__name__)


class EngineDead(GraphoptError):
    """The engine loop failed; in-flight requests end with this error."""


class Observer(Protocol):
    """Receives per-token timings (the Prometheus metrics implement it)."""

    def on_token(self, output: RequestOutput, ttft: float | None, itl: float | None) -> None: ...

    def on_finish(self, output: RequestOutput) -> None: ...


class AsyncLLM:
    """Runs ``llm``'s step loop in a thread; :meth:`stream` yields each request's outputs as they come."""

    def __init__(self, llm: LLM, observer: Observer | None = None) -> None:
        self.llm = llm
        self.observer = observer
        self._queues: dict[str, asyncio.Queue] = {}
        self._last_time: dict[str, float] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="graphopt-engine", daemon=True)
        self._thread.start()

    async def drain(self, timeout: float) -> None:
        """Refuse new requests; wait up to ``timeout`` s for in-flight ones, then cancel the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._queues and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._queues:
            log.warning("shutdown: cancelling %d unfinished requests", len(self._queues))
        for request_id in list(self._queues):
            self._abort(request_id)

    async def shutdown(self) -> None:
        """Refuse new requests, cancel what is left, stop the engine thread."""
        self._accepting = False
        for request_id in list(self._queues):
            self._abort(request_id)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    # ---- requests ----------------------------------------------------------------------------------------
    def submit(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams]) -> tuple[list[str],
                                                                                                asyncio.Queue]:
        """Queue requests now (``params`` one for all, or one each), raising at once if one is refused (none
        stays queued then); their outputs arrive on the returned queue. Read it with :meth:`outputs`."""
        if not self._accepting:
            raise OverloadedError("the server is shutting down; retry on another replica")
        queue: asyncio.Queue = asyncio.Queue()
        ids: list[str] = []
        each = params if isinstance(params, list) else [params] * len(prompts)
        try:
            for prompt, one in zip(prompts, each, strict=True):
                seq = self.llm.add_request(prompt, one)
                ids.append(seq.request_id)
                self._queues[seq.request_id] = queue
                self._last_time[seq.request_id] = seq.arrival_time
        except Exception:
            for request_id in ids:
                self._abort(request_id)
            raise
        with self._wake:
            self._wake.notify()
        return ids, queue

    async def outputs(self, ids: list[str], queue: asyncio.Queue) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) as they come, until every request finished; leaving early aborts the rest."""
        index = {request_id: i for i, request_id in enumerate(ids)}
        pending = set(ids)
        try:
            while pending:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.request_id not in pending:
                    continue
                if item.finished:
                    pending.discard(item.request_id)
                yield index[item.request_id], item
        finally:
            for request_id in pending:
                self._abort(request_id)

    async def stream(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One request's outputs (submitted when this is awaited)."""
        return self._single(self.outputs(*self.submit([prompt], params)))

    @staticmethod
    async def _single(outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[RequestOutput]:
        try:
            async for _, out in outputs:
                yield out
        finally:
            await outputs.aclose()

    async def generate(self, prompt: Prompt, params: SamplingParams) -> Completion:
        outputs = [out async for out in await self.stream(prompt, params)]
        return collect_completion(outputs[-1].seq, outputs)

    def _abort(self, request_id: str) -> None:
        queue = self._queues.pop(request_id, None)
        self._last_time.pop(request_id, None)
        seq = self.llm.abort(request_id)
        if seq is None:
            return
        log.debug("request %s cancelled", request_id)
        with self._wake:
            self._wake.notify()  # the engine frees the slot at its next step, even when otherwise idle
        out = RequestOutput(request_id, [], "", [], "cancelled", seq, len(seq.output_ids), time.perf_counter())
        if self.observer is not None:
            self.observer.on_finish(out)
        if queue is not None:
            queue.put_nowait(out)

    # ---- engine thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.llm.has_work:
                    self._wake.wait()
                if self._stopping and not self.llm.has_work:
                    return
            try:
                outputs = self.llm.step()
            except Exception as exc:  # keep serving: fail what was in flight, free every slot
                log.exception("engine step failed; cancelling %d in-flight requests", len(self._queues))
                self._loop.call_soon_threadsafe(self._fail_all, EngineDead(f"engine step failed: {exc}"))
                self.llm.abort_all()
                continue
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is None:
                continue  # aborted while the step ran
            if self.observer is not None:
                self._observe(out)
            queue.put_nowait(out)
            if out.finished:
                del self._queues[out.request_id]
                self._last_time.pop(out.request_id, None)

    def _observe(self, out: RequestOutput) -> None:
        if out.token_ids:
            first = out.num_generated == 1
            previous = self._last_time.get(out.request_id, out.time)
            self._last_time[out.request_id] = out.time
            ttft = out.time - out.seq.arrival_time if first else None
            self.observer.on_token(out, ttft, None if first else out.time - previous)
        if out.finished:
            self.observer.on_finish(out)

    def _fail_all(self, error: BaseException) -> None:
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(error)
            del self._queues[request_id]

