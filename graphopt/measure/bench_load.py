"""Load benchmark of ``graphopt serve`` (a script, not a test): ``python -m graphopt.measure.bench_load ARTIFACT``.

Two phases against one ``graphopt serve`` subprocess on 127.0.0.1, driven by the ``openai`` async client:

1. **load**: ``--clients`` streaming clients (default 64) loop for ``--duration`` seconds, each request with
   a random prompt length and output length, about ``--cancel-rate`` of them cancelled at a random token.
   Reports requests, generated tokens/s, TTFT and ITL p50/p99, HTTP status counts (5xx must be 0), slots in
   use after the clients stop (must return to 0), and the server's RSS after warm-up vs at the end.
2. **throughput** (graphopt/measure/bench_batching.py): ``--batch`` clients (default 8) arriving ``--stagger-ms``
   apart vs ONNX Runtime GenAI's static batches of the same requests, measured afterwards in this process
   with the server stopped (both with the same thread count), on two workloads: *equal* (one request per
   client, 64-token prompt, 128 greedy tokens: GenAI's best case) and *mixed* (``--mixed-requests``
   requests with output lengths drawn from ``--mixed-output-tokens``); graphopt both through the server and
   in process on its engine loop (GenAI's setting). Prints the ratios.

Timings on a shared machine are indicative only. Prompts are random token ids (the completions API takes ids).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import click
import numpy as np
import openai
import psutil

from graphopt.measure.bench_batching import (equal_workload, genai_throughput, graphopt_throughput, load_genai,
                                             mixed_workload, runtime_throughput)
from graphopt.runtime.engine import physical_cores


@dataclasses.dataclass
class Record:
    status: int
    ttft: float | None = None
    itls: list[float] = dataclasses.field(default_factory=list)
    tokens: int = 0
    cancelled: bool = False


class Server:
    """``graphopt serve`` in a subprocess on a free port."""

    def __init__(self, artifact: Path, max_slots: int, max_seq: int, threads: int) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [sys.executable, "-c", "from graphopt.cli.main import main; main()", "serve", str(artifact),
                   "--port", str(self.port), "--max-slots", str(max_slots), "--max-queue", "1024",
                   "--max-seq", str(max_seq),
                   "--threads", str(threads), "--model-name", "bench"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while not self._healthy():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise click.ClickException("graphopt serve did not start; run it by hand to see why")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200
        except OSError:
            return False

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)

    def rss_mib(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(timeout=60)


async def one_request(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int, cancel_at: int | None,
                      greedy: bool) -> Record:
    start = time.perf_counter()
    try:
        stream = await client.completions.create(
            model="bench", prompt=prompt, max_tokens=max_tokens, stream=True, temperature=0 if greedy else 0.8,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    except openai.APIStatusError as exc:
        return Record(exc.status_code)
    record, last = Record(200), start
    async for chunk in stream:
        if not chunk.choices:  # the closing usage chunk
            record.tokens = chunk.usage.completion_tokens if chunk.usage else record.tokens
            continue
        now = time.perf_counter()
        if record.ttft is None:
            record.ttft = now - start
        else:
            record.itls.append(now - last)
        last = now
        record.tokens += 1
        if cancel_at is not None and record.tokens >= cancel_at:
            record.cancelled = True
            await stream.close()
            break
    return record


async def load_phase(url: str, clients: int, duration: float, cancel_rate: float, prompt_range: tuple[int, int],
                     output_range: tuple[int, int], vocab: int, seed: int) -> tuple[list[Record], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    deadline = time.perf_counter() + duration

    async def worker(index: int) -> list[Record]:
        rng, records = np.random.default_rng(seed + index), []
        await asyncio.sleep(rng.random() * 2)  # spread the first arrivals over 2 s
        while time.perf_counter() < deadline:
            prompt = rng.integers(10, vocab, size=int(rng.integers(*prompt_range))).tolist()
            max_tokens = int(rng.integers(*output_range))
            cancel_at = int(rng.integers(1, max_tokens)) if rng.random() < cancel_rate and max_tokens > 1 else None
            records.append(await one_request(client, prompt, max_tokens, cancel_at, greedy=False))
            if records[-1].status == 429:
                await asyncio.sleep(1.0)
        return records

    start = time.perf_counter()
    results = await asyncio.gather(*(worker(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    return [r for records in results for r in records], elapsed


async def sampling_rss(server: Server, work) -> tuple[list[Record], float, list[float]]:
    """Run the load phase while sampling the server's RSS at each quarter of the run (a leak keeps growing)."""
    samples: list[float] = []
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=15)
        samples.append(server.rss_mib())
    records, elapsed = task.result()
    quarters = [samples[min(len(samples) - 1, int(len(samples) * q))] for q in (0.25, 0.5, 0.75)] if samples else []
    return records, elapsed, quarters


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    p50, p99 = np.percentile(np.asarray(values) * 1e3, [50, 99])
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms"


def report_load(records: list[Record], elapsed: float, slots_after: float, rss: list[float]) -> dict:
    ok = [r for r in records if r.status == 200]
    statuses: dict[int, int] = {}
    for r in records:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    summary = {
        "requests": len(records), "completed": sum(not r.cancelled for r in ok),
        "cancelled": sum(r.cancelled for r in ok), "statuses": statuses,
        "server_errors_5xx": sum(n for s, n in statuses.items() if s >= 500),
        "generated_tokens_per_s": round(sum(r.tokens for r in ok) / elapsed, 1),
        "ttft": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl": percentiles([t for r in ok for t in r.itls]), "slots_in_use_after": slots_after,
        "rss_mib_start_q1_q2_q3_end": [round(v) for v in rss], "seconds": round(elapsed, 1)}
    for key, value in summary.items():
        click.echo(f"  {key:24} {value}")
    return summary


def wait_slots_free(server: Server, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while (slots := server.metric("graphopt_slots_in_use")) and time.monotonic() < deadline:
        time.sleep(0.2)
    return slots


@click.command()
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.option("--clients", default=64, show_default=True)
@click.option("--duration", default=180.0, show_default=True, help="Seconds of the load phase.")
@click.option("--cancel-rate", default=0.1, show_default=True)
@click.option("--prompt-tokens", default=(16, 256), nargs=2, type=int, show_default=True, help="Range.")
@click.option("--output-tokens", default=(16, 256), nargs=2, type=int, show_default=True, help="Range.")
@click.option("--max-slots", default=16, show_default=True)
@click.option("--max-seq", default=512, show_default=True, help="Context per slot (KV memory = slots x max-seq).")
@click.option("--batch", default=8, show_default=True, help="Clients in the throughput phase.")
@click.option("--stagger-ms", default=50.0, show_default=True)
@click.option("--mixed-requests", default=32, show_default=True, help="Requests in the mixed workload.")
@click.option("--mixed-output-tokens", default=(16, 256), nargs=2, type=int, show_default=True, help="Range.")
@click.option("--skip-load", is_flag=True)
@click.option("--skip-throughput", is_flag=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(artifact, clients, duration, cancel_rate, prompt_tokens, output_tokens, max_slots, max_seq, batch,
         stagger_ms, mixed_requests, mixed_output_tokens, skip_load, skip_throughput, seed, json_out) -> None:
    """Load-test ``graphopt serve ARTIFACT`` and compare staggered throughput with ONNX Runtime GenAI."""
    threads = physical_cores()
    vocab = json.loads((artifact / "manifest.json").read_text())["model"]["vocab_size"]
    results: dict = {"clients": clients, "max_slots": max_slots, "threads": threads}
    if prompt_tokens[1] + output_tokens[1] > max_seq:
        raise click.BadParameter(f"prompt + output tokens can reach {prompt_tokens[1] + output_tokens[1]}, over "
                                 f"--max-seq {max_seq}; raise --max-seq", param_hint="--max-seq")
    server = Server(artifact, max(max_slots, batch), max_seq, threads)
    workloads = {"equal": equal_workload(batch, 128, vocab, seed),
                 "mixed": mixed_workload(mixed_requests, mixed_output_tokens, vocab, seed)}
    try:
        asyncio.run(graphopt_throughput(server.url, workloads["equal"][:2], 2, 0.0))  # warm-up
        rss_start = server.rss_mib()
        if not skip_load:
            click.echo(f"load: {clients} streaming clients for {duration:.0f} s, {cancel_rate:.0%} cancelled")
            records, elapsed, rss = asyncio.run(sampling_rss(server, load_phase(
                server.url, clients, duration, cancel_rate, prompt_tokens, output_tokens, vocab, seed)))
            rss = [rss_start, *rss, server.rss_mib()]
            results["load"] = report_load(records, elapsed, wait_slots_free(server), rss)
        if not skip_throughput:
            for name, requests in workloads.items():
                results[name] = {"graphopt_tok_s": round(asyncio.run(
                    graphopt_throughput(server.url, requests, batch, stagger_ms / 1e3)), 1)}
    finally:
        results["server_exit_code"] = server.stop()
    if not skip_throughput:
        for name, requests in workloads.items():
            results[name]["runtime_tok_s"] = round(runtime_throughput(
                artifact, requests, batch, stagger_ms / 1e3, threads, max_seq), 1)
        genai = load_genai(artifact, threads)
        for name, requests in workloads.items():
            row = results[name]
            row["genai_static_tok_s"] = round(genai_throughput(genai, requests, batch), 1)
            row["ratio_http"] = round(row["graphopt_tok_s"] / row["genai_static_tok_s"], 2)
            row["ratio_in_process"] = round(row["runtime_tok_s"] / row["genai_static_tok_s"], 2)
            lengths = sorted({r.max_tokens for r in requests})
            shape = f"{len(requests)} requests, 64+{lengths[0]}..{lengths[-1]} tokens"
            click.echo(f"throughput {name} ({shape}; {batch} at once, first {stagger_ms:.0f} ms apart): graphopt "
                       f"serve {row['graphopt_tok_s']} tok/s ({row['ratio_http']:.2f}x), graphopt in process "
                       f"{row['runtime_tok_s']} tok/s ({row['ratio_in_process']:.2f}x) vs GenAI static batches of "
                       f"{batch} {row['genai_static_tok_s']} tok/s")
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
