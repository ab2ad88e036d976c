"""graphopt bench: batch-1 greedy TTFT and decode tok/s of an artifact vs peers on the same weights, one run.

Every engine runs the same loop (:func:`timed_loop`): one prompt call that yields the first token, then
``new_tokens - 1`` one-token calls, argmax each time, end tokens ignored (``generate()`` always stops at eos,
so bench drives the engine calls itself):

    graphopt  engine.prefill → argmax → engine.decode → argmax … (the calls generate() makes)
    hf        transformers eager PyTorch (sdpa, no torch.compile): model(ids, DynamicCache, logits_to_keep=1) …
    genai     onnxruntime-genai's CPU model from its own builder at the artifact's precision (fp32, int8,
              int4 with the same block; graphopt/measure/genai_peer.py; built once, cached): append_tokens,
              generate_next_token …; min_length = max_length, so it never stops early (eos is masked)
    llamacpp  llama.cpp on the source GGUF's own blocks (measure/llamacpp_peer.py): eval(prompt) → argmax …

Each peer's weight precision is in the results (``peer_precision``); where it differs from the
artifact's (hf always runs fp32; GenAI has no fp8 or per-channel int8; llama.cpp runs the GGUF's own blocks,
which only a --keep-quant artifact keeps), ``precision_mismatch`` says so
and print_bench prints it — a ratio is never silently a comparison across precisions.

TTFT = start → first token known; decode tok/s = (new_tokens - 1) / (last token − first token). One warm-up
run per engine, then ``repeats`` rounds each running every engine once (interleaved, so background load hits
all alike; ``SETTLE_S`` idle before each run); medians. All engines use ``threads`` intra-op threads (the
physical cores). ``rss_added_mib``: RSS growth while an engine loaded and warmed up (one shared process:
approximate). ``other_cpu_cores``: CPU other processes used during a run (on 2 cores even 0.3 skews it).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from graphopt.core.errors import ArtifactError, RuntimeInputError, SourceError
from graphopt.core.manifest import load_manifest
from graphopt.core.progress import Progress
from graphopt.runtime.engine import physical_cores
from graphopt.runtime.engine_api import open_engine
from graphopt.runtime.tokenizer import load_tokenizer
from graphopt.measure.genai_peer import artifact_peer_precision, genai_model, peer_precisions
from graphopt.measure.llamacpp_peer import llama_calls, open_llama, source_gguf, with_llamacpp
from graphopt.sources import load_causal_lm, resolve_source

PEERS = ("hf", "genai", "llamacpp")
SETTLE_S = 0.5  # idle before each timed run: the last engine's spinning thread pool costs the next ~25 ms TTFT
PROMPT_TEXT = (  # real English, tokenized and repeated/cut to the prompt length
    "The history of computing is a story of layers. Engineers first wired programs by hand into machines that "
    "filled whole rooms, then wrote them as numbers, then as words that a compiler turned into numbers. Each "
    "layer hid the one below it and let more people build useful things without knowing how the wires ran.")

Runner = Callable[[Sequence[int], int], "Run"]


class Run(NamedTuple):
    tokens: list[int]
    ttft_ms: float
    decode_tokens_per_s: float
    other_cpu_cores: float = 0.0  # CPU other processes used during the run (and the settle pause before it)


def timed_loop(first: Callable[[], int], step: Callable[[int], int], new_tokens: int) -> Run:
    """``first()`` runs the prompt and returns token 1; ``step(t)`` feeds token t and returns the next."""
    start = time.perf_counter()
    tokens = [first()]
    t_first = time.perf_counter()
    while len(tokens) < new_tokens:
        tokens.append(step(tokens[-1]))
    t_last = time.perf_counter()
    return Run(tokens, (t_first - start) * 1e3, (new_tokens - 1) / (t_last - t_first) if new_tokens > 1 else 0.0)


def benchmark_prompt(tokenizer: Any, prompt_tokens: int) -> list[int]:
    """Exactly ``prompt_tokens`` ids: the fixed English paragraph tokenized, repeated and cut to length."""
    ids = list(tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"])
    return (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]


def graphopt_runner(artifact: Path, threads: int) -> Runner:
    engine = open_engine(artifact, max_slots=1, threads=threads)

    def run(prompt: Sequence[int], new_tokens: int) -> Run:
        slot = engine.cache.allocate()
        try:
            return timed_loop(lambda: int(engine.prefill([prompt], [slot])[0].argmax()),
                              lambda token: int(engine.decode([token])[0].argmax()), new_tokens)
        finally:
            engine.cache.free_all()

    return run


def hf_runner(source: Any, threads: int) -> Runner:
    torch.set_num_threads(threads)
    model = load_causal_lm(source)  # fp32, sdpa attention, eval

    def call(ids: list[list[int]], cache: DynamicCache) -> int:  # logits of the last position only, as ours
        out = model(input_ids=torch.tensor(ids), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    def run(prompt: Sequence[int], new_tokens: int) -> Run:
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            return timed_loop(lambda: call([list(prompt)], cache), lambda token: call([[token]], cache), new_tokens)

    return run


def genai_runner(model_dir: Path, threads: int) -> Runner:
    import onnxruntime_genai as og

    config, options = og.Config(str(model_dir)), {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)

    def run(prompt: Sequence[int], new_tokens: int) -> Run:
        params, total = og.GeneratorParams(model), len(prompt) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)

        def next_token(_: int = 0) -> int:  # runs the pending tokens, then picks the argmax
            generator.generate_next_token()
            return int(generator.get_next_tokens()[0])

        def first() -> int:
            generator.append_tokens(np.asarray(prompt, dtype=np.int32))
            return next_token()

        return timed_loop(first, next_token, new_tokens)

    return run


def artifact_source(manifest: Any) -> Any:
    """The artifact's source weights, checked against the fingerprint recorded at build time."""
    recorded = manifest.source.to_json()
    if not (spec := recorded.get("spec")):
        raise ArtifactError("manifest.json has no source.spec; rebuild the artifact to compare it with peers")
    try:
        source = resolve_source(spec)
    except SourceError as exc:
        raise SourceError(f"bench needs the artifact's source weights ('{spec}') to run the peers: {exc}") from None
    if recorded.get("sha256") and source.sha256 != recorded["sha256"]:
        raise ArtifactError(f"the weights at '{source.model_dir}' changed since the artifact was built "
                            "(fingerprint differs); rebuild the artifact or restore the weights")
    return source


def run_bench(artifact: Path, peers: list[str], prompt_tokens: int, new_tokens: int, repeats: int,
              progress: Progress | None = None, threads: int | None = None) -> dict[str, Any]:
    """Time graphopt and ``peers`` (of PEERS) on the artifact's weights; a JSON-serialisable dict."""
    check_args(peers, prompt_tokens, new_tokens, repeats)
    progress = progress or Progress()
    threads = threads or physical_cores()
    manifest, machine = load_manifest(artifact), machine_info()
    tokenizer = load_tokenizer(artifact)
    prompt = benchmark_prompt(tokenizer, prompt_tokens)
    factories: dict[str, Callable[[], Runner]] = {"graphopt": lambda: graphopt_runner(Path(artifact), threads)}
    gguf = None
    if peers:
        source = artifact_source(manifest)
        if "hf" in peers:
            factories["hf"] = lambda: hf_runner(source, threads)
        if "genai" in peers:
            genai_dir = genai_model(source, progress, artifact_peer_precision(Path(artifact), manifest))
            factories["genai"] = lambda: genai_runner(genai_dir, threads)
        if "llamacpp" in peers:
            gguf = source_gguf(source)
            factories["llamacpp"] = lambda: llamacpp_runner(gguf, threads, prompt_tokens + new_tokens)
    runs, setup = measure(factories, prompt, new_tokens, repeats, progress)
    machine["other_cpu_cores"] = max(run.other_cpu_cores for engine_runs in runs.values() for run in engine_runs)
    engines = {name: summarize(engine_runs) | setup[name] for name, engine_runs in runs.items()}
    agreement = {peer: token_agreement(runs["graphopt"][-1].tokens, runs[peer][-1].tokens) for peer in runs
                 if peer != "graphopt"}
    return {"model": (manifest.source.id or Path(artifact).name), "artifact": str(artifact),
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
            "engines": engines, "ratios": ratios(engines), "tokens_match": agreement, "machine": machine,
            "versions": versions(list(runs))} | with_llamacpp(peer_precisions(Path(artifact), manifest, peers), gguf)


def llamacpp_runner(gguf: Path, threads: int, n_ctx: int) -> Runner:
    llm = open_llama(gguf, threads, n_ctx)
    first, step = llama_calls(llm)
    return lambda prompt, new_tokens: timed_loop(lambda: first(prompt), step, new_tokens)


def check_args(peers: list[str], prompt_tokens: int, new_tokens: int, repeats: int) -> None:
    if unknown := sorted(set(peers) - set(PEERS)):
        raise RuntimeInputError(f"unknown peer(s) {unknown}; choose from {list(PEERS)}")
    for flag, n, low in (("prompt-tokens", prompt_tokens, 1), ("new-tokens", new_tokens, 2), ("repeats", repeats, 1)):
        if n < low:
            raise RuntimeInputError(f"--{flag} {n} is too small; use at least {low}")


def measure(factories: dict[str, Callable[[], Runner]], prompt: list[int], new_tokens: int, repeats: int,
            progress: Progress) -> tuple[dict[str, list[Run]], dict[str, dict[str, float]]]:
    """Load + warm up each engine (load time, RSS growth), then interleaved timed rounds."""
    process, runners, setup = psutil.Process(), {}, {}
    for name, factory in factories.items():
        rss, start = process.memory_info().rss, time.perf_counter()
        with progress.step(f"loading and warming up {name}"):
            runners[name] = factory()
            load_s = time.perf_counter() - start
            runners[name](prompt, new_tokens)
        setup[name] = {"load_s": round(load_s, 2), "rss_added_mib": round((process.memory_info().rss - rss) / 2**20)}
    runs: dict[str, list[Run]] = {name: [] for name in runners}
    with progress.step(f"timing {len(runners)} engine(s): {repeats} round(s) of {new_tokens} tokens"):
        for _ in range(repeats):
            for name, runner in runners.items():
                before = _cpu_seconds(process)
                time.sleep(SETTLE_S)
                run = runner(prompt, new_tokens)
                busy, own, wall = (b - a for a, b in zip(before, _cpu_seconds(process)))
                runs[name].append(run._replace(other_cpu_cores=round(max(0.0, busy - own) / wall, 2)))
    return runs, setup


def _cpu_seconds(process: psutil.Process) -> tuple[float, float, float]:
    """(machine busy CPU s incl. hypervisor steal, this process's CPU s, wall s)."""
    cpu, own = psutil.cpu_times()._asdict(), process.cpu_times()
    busy = sum(cpu.get(field, 0.0) for field in ("user", "nice", "system", "irq", "softirq", "steal"))
    return busy, own.user + own.system, time.perf_counter()


def summarize(runs: list[Run]) -> dict[str, Any]:
    each = [{"ttft_ms": round(r.ttft_ms, 2), "decode_tokens_per_s": round(r.decode_tokens_per_s, 2),
             "other_cpu_cores": r.other_cpu_cores} for r in runs]
    return {key: round(statistics.median(r[key] for r in each), 2) for key in each[0]} | {"runs": each}


def ratios(engines: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Above 1 means graphopt is better: decode = ours / theirs, TTFT = theirs / ours."""
    ours, out = engines["graphopt"], {}
    for peer in (name for name in engines if name != "graphopt"):
        out[f"decode_vs_{peer}"] = round(ours["decode_tokens_per_s"] / engines[peer]["decode_tokens_per_s"], 3)
        out[f"ttft_vs_{peer}"] = round(engines[peer]["ttft_ms"] / ours["ttft_ms"], 3)
    return out


def token_agreement(ours: list[int], theirs: list[int]) -> dict[str, Any]:
    diverge = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if diverge is None and len(ours) != len(theirs):
        diverge = min(len(ours), len(theirs))
    return {"match": diverge is None, "first_divergence": diverge, "compared": max(len(ours), len(theirs))}


def machine_info() -> dict[str, Any]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text(errors="replace").splitlines() if info.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "physical_cores": physical_cores(), "logical_cores": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def versions(engines: list[str]) -> dict[str, str]:
    packages = {"graphopt": ["onnxruntime"], "hf": ["torch", "transformers"], "genai": ["onnxruntime-genai"],
                "llamacpp": ["llama-cpp-python"]}
    return {package: version(package) for engine in engines for package in packages[engine]}


def print_bench(results: dict[str, Any]) -> None:
    """A rich table on stdout, one row per engine; "graphopt ×" columns > 1 mean graphopt is faster."""
    table = Table(title=f"{results['model']}: batch 1, {results['prompt_tokens']}-token prompt, {results['new_tokens']}"
                        f" greedy tokens, {results['threads']} threads, median of {results['repeats']}")
    for column in ("engine", "TTFT ms", "decode tok/s", "graphopt × TTFT", "graphopt × decode", "load s", "+RSS MiB"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    ratio = results["ratios"]
    for name, engine in results["engines"].items():
        times = [f"{ratio[f'{kind}_vs_{name}']:.2f}" if name != "graphopt" else "—" for kind in ("ttft", "decode")]
        table.add_row(name, f"{engine['ttft_ms']:.1f}", f"{engine['decode_tokens_per_s']:.1f}", *times,
                      f"{engine['load_s']:.1f}", f"{engine['rss_added_mib']:.0f}")
    console = Console(width=max(Console().width, 100))
    console.print(table)
    genai = results.get("genai_model") or {}
    detail = f" block {genai.get('block_size')}, accuracy_level {genai.get('accuracy_level')}" \
        if genai.get("block_size") else ""
    peers = ", ".join(f"{name} {kind}" + (detail if name == "genai" else "")
                      for name, kind in results.get("peer_precision", {}).items())
    console.print(f"weights: graphopt {results.get('precision', 'fp32')}" + (f"; {peers}" if peers else ""))
    for line in results.get("precision_mismatch", []):
        console.print(f"[yellow]precision mismatch: {line}[/]")
    for peer, agreement in results["tokens_match"].items():
        verdict = "match" if agreement["match"] else f"diverge at token {agreement['first_divergence']}"
        console.print(f"greedy tokens graphopt vs {peer}: {verdict} ({agreement['compared']} compared)")
    machine = results["machine"]
    console.print(f"{machine['cpu']}, {machine['physical_cores']} physical cores; other processes used up to "
                  f"{machine['other_cpu_cores']} cores during a run (load avg {machine['load_avg_1m']} at start)")
    if machine["other_cpu_cores"] > 0.25:
        console.print("[yellow]warning: the machine was busy while timing; the numbers are perturbed (rerun idle)[/]")
