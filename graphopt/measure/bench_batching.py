"""Throughput phase of ``bench_load``: in-flight batching (graphopt serve) vs ONNX Runtime GenAI's static batch.

Two workloads, both with 64-token prompts of random ids, greedy, end token ignored, measured in one run:

* **equal**: ``batch`` requests of ``equal_tokens`` new tokens each, arriving ``stagger`` apart at the server;
  GenAI gets them as one static batch that is ready at t=0 (its best case: no waiting, no padding, no waste).
* **mixed**: a stream of ``requests`` with output lengths drawn uniformly from ``output_range``, served by
  ``batch`` concurrent clients (each sends its next request when the previous one ends; first arrivals
  ``stagger`` apart). GenAI takes the same requests in arrival order, ``batch`` at a time, as static batches:
  a static batch has one ``max_length``, so it runs until its longest request is done and the tokens it makes
  for the shorter requests after their own ``max_tokens`` are waste. This is the case in-flight batching is for:
  a finished request frees its slot at once and the next one starts in the same step.

graphopt is measured twice: through ``graphopt serve`` with streaming OpenAI clients, and in process on its
engine loop (``LLM.step``, arrivals seen between steps) like GenAI, which runs in process with no clients.
Throughput is useful generated tokens (each request's own ``max_tokens``) per second of wall time, from the
first arrival to the last token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import time
from pathlib import Path

import numpy as np
import openai

PROMPT_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def equal_workload(batch: int, new_tokens: int, vocab: int, seed: int) -> list[Request]:
    prompts = np.random.default_rng(seed).integers(10, vocab, size=(batch, PROMPT_TOKENS)).tolist()
    return [Request(p, new_tokens) for p in prompts]


def mixed_workload(count: int, output_range: tuple[int, int], vocab: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed + 1)
    prompts = rng.integers(10, vocab, size=(count, PROMPT_TOKENS)).tolist()
    lengths = rng.integers(output_range[0], output_range[1] + 1, size=count)
    return [Request(p, int(n)) for p, n in zip(prompts, lengths)]


async def _complete(client: openai.AsyncOpenAI, request: Request) -> int:
    """Stream one greedy completion to its end; the number of tokens received."""
    stream = await client.completions.create(
        model="bench", prompt=request.prompt, max_tokens=request.max_tokens, stream=True, temperature=0,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    tokens = 0
    async for chunk in stream:
        if chunk.usage is not None:  # the closing usage chunk
            tokens = chunk.usage.completion_tokens
    return tokens


async def graphopt_throughput(url: str, requests: list[Request], concurrency: int, stagger_s: float) -> float:
    """Useful tokens/s for ``requests`` served by ``concurrency`` closed-loop clients of ``graphopt serve``."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    queue = list(reversed(requests))
    received: list[int] = []

    async def worker(index: int) -> None:
        await asyncio.sleep(index * stagger_s)
        while queue:
            request = queue.pop()
            got = await _complete(client, request)
            if got != request.max_tokens:
                raise RuntimeError(f"graphopt serve returned {got} of {request.max_tokens} tokens")
            received.append(got)

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return sum(received) / elapsed


def runtime_throughput(artifact: Path, requests: list[Request], concurrency: int, stagger_s: float, threads: int,
                       max_seq: int) -> float:
    """The same closed loop in this process on graphopt's engine loop (``LLM.step``), without HTTP: the
    like-for-like peer of GenAI's in-process figure (on a 2-core machine the HTTP clients and the server's
    event loop take CPU from ONNX Runtime)."""
    from graphopt.runtime.llm import LLM
    from graphopt.runtime.sampler import SamplingParams

    llm = LLM(artifact, max_slots=concurrency, max_seq=max_seq, threads=threads)
    llm.generate([requests[0].prompt], SamplingParams(max_new_tokens=4))  # warm-up
    pending, active, started, tokens = list(requests), 0, 0, 0
    start = time.perf_counter()
    while pending or llm.has_work:
        now = time.perf_counter() - start
        while pending and active < concurrency and (started >= concurrency or now >= started * stagger_s):
            request = pending.pop(0)  # arrivals are seen between steps, as the server's engine loop sees them
            llm.add_request(request.prompt, SamplingParams(max_new_tokens=request.max_tokens, ignore_eos=True))
            active, started = active + 1, started + 1
        if not llm.has_work:
            time.sleep(0.001)
            continue
        for out in llm.step():
            tokens += len(out.token_ids)
            active -= out.finished
    elapsed = time.perf_counter() - start
    del llm
    gc.collect()  # its thread pool goes before the next engine's starts
    return tokens / elapsed


def load_genai(artifact: Path, threads: int, progress=None):
    """ONNX Runtime GenAI's model for ``artifact``'s source at the artifact's precision (built once, cached;
    graphopt/measure/genai_peer.py; ``progress`` shows the build). Load it once per process: a second
    ``og.Model`` keeps the first one's thread pool alive and the two fight over the cores."""
    import onnxruntime_genai as og

    from graphopt.measure.bench import artifact_source
    from graphopt.measure.genai_peer import artifact_peer_precision, genai_model
    from graphopt.core.manifest import load_manifest
    from graphopt.core.progress import Progress

    manifest = load_manifest(artifact)
    peer = artifact_peer_precision(Path(artifact), manifest)
    model_dir = genai_model(artifact_source(manifest), progress or Progress(enabled=False), peer)
    config = og.Config(str(model_dir))
    config.clear_providers()
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def genai_throughput(model, requests: list[Request], batch: int) -> float:
    """Useful tokens/s for ``requests`` run by ONNX Runtime GenAI ``model`` as static batches of ``batch``, in
    arrival order."""
    import onnxruntime_genai as og

    useful, start = 0, time.perf_counter()
    for first in range(0, len(requests), batch):
        group = requests[first:first + batch]
        total = PROMPT_TOKENS + max(r.max_tokens for r in group)  # one max_length for the whole batch
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=len(group))
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([r.prompt for r in group], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        useful += sum(r.max_tokens for r in group)
        del generator
    return useful / (time.perf_counter() - start)
