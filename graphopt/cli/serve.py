"""CLI command that serves an artifact over an OpenAI-compatible HTTP API: ``graphopt serve``."""

from __future__ import annotations

from pathlib import Path

import click

from graphopt.cli.run import spec_config, spec_options
from graphopt.core.errors import RuntimeInputError
from graphopt.runtime.config import DEFAULTS, MAX_SEQ_HELP, LLMConfig


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", default=None, envvar="GRAPHOPT_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (also from $GRAPHOPT_API_KEY).")
@click.option("--max-slots", "--max-num-seqs", default=DEFAULTS.max_slots, show_default=True, type=int,
              help="Requests decoded together (KV slots).")
@click.option("--max-queue", default=DEFAULTS.max_queue, show_default=True, type=int,
              help="Requests waiting for a slot; more get 429 with Retry-After.")
@click.option("--max-seq", "--max-model-len", default=None, type=int, help=MAX_SEQ_HELP)
@click.option("--max-batch-tokens", default=DEFAULTS.max_batch_tokens, show_default=True, type=int,
              help="Prompt tokens per prefill step; longer prompts are prefilled in chunks.")
@click.option("--threads", default=None, type=int, help="ONNX Runtime threads (default: physical cores).")
@click.option("--generation-config", default="auto", show_default=True,
              help="Sampling defaults for fields a request leaves out: auto (the artifact's generation_config.json), "
                   "vllm or none (the API's own), or a folder holding a generation_config.json.")
@click.option("--no-prefix-cache", is_flag=True,
              help="Prefill every prompt from its first token (default: reuse the KV of a cached prefix).")
@click.option("--model-name", "--served-model-name", default=None, help="Model id clients send (default: the artifact folder's name).")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=int)
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=float,
              help="Seconds in-flight requests get to finish after SIGTERM before they are cancelled.")
@click.option("--header-timeout", default=10.0, show_default=True, type=float,
              help="Seconds a connection gets to send complete request headers (else 408, closed).")
@click.option("--body-timeout", default=30.0, show_default=True, type=float,
              help="Seconds a request body may take once its headers are in (else 408).")
@click.option("--max-connections", default=256, show_default=True, type=int,
              help="Connections served at once; requests on more are answered 503.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve as a Ray Serve deployment (needs graphopt[ray]).")
@click.option("--replicas", default=1, show_default=True, type=int, help="Ray Serve replicas (one engine each).")
@click.option("--ray-address", default=None, help="Existing Ray cluster (default: start a local one on loopback).")
@spec_options
def serve(artifact, host, port, api_key, max_slots, max_queue, max_seq, max_batch_tokens, threads, generation_config,
          no_prefix_cache, model_name, max_body_bytes, shutdown_timeout, header_timeout, body_timeout, max_connections, use_ray,
          replicas, ray_address, draft, speculative, num_spec, fixed_k) -> None:
    """Serve ARTIFACT with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /metrics)."""
    from graphopt.runtime.server import ServerConfig

    _check_flags(port, {"--max-slots": max_slots, "--max-queue": max_queue, "--replicas": replicas,
                        "--max-batch-tokens": max_batch_tokens, "--max-body-bytes": max_body_bytes,
                        "--max-connections": max_connections},
                 {"--header-timeout": header_timeout, "--body-timeout": body_timeout,
                  "--shutdown-timeout": shutdown_timeout})
    if not (artifact / "manifest.json").is_file():
        raise RuntimeInputError(f"{artifact} is not a graphopt artifact (no manifest.json); build one with "
                                "'graphopt build MODEL -o DIR'")
    llm = LLMConfig(max_slots=max_slots, max_seq=max_seq, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                    threads=threads, speculative=spec_config(draft, speculative, num_spec, fixed_k, threads),
                    prefix_cache=not no_prefix_cache)
    config = ServerConfig(artifact, host, port, api_key, llm, model_name, max_body_bytes, shutdown_timeout,
                          header_timeout, body_timeout, max_connections, generation_config=generation_config)
    if use_ray:
        from graphopt.runtime.ray_serve import serve_ray

        serve_ray(config, replicas, ray_address)
        return
    if replicas != 1:
        raise RuntimeInputError("--replicas needs --ray; without it the server runs one engine")
    from graphopt.runtime.server import serve as run_server

    if api_key is None and host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach this address can use the "
                   "server; pass --api-key KEY", err=True)
    click.echo(f"serving {artifact} on http://{host}:{port}/v1 (Ctrl-C or SIGTERM to stop)", err=True)
    run_server(config)


def _check_flags(port: int, counts: dict[str, int], seconds: dict[str, float]) -> None:
    """One line naming the first flag out of range: counts >= 1, seconds in (0, a day), a port in 0..65535."""
    for name, value in counts.items():
        if value < 1:
            raise RuntimeInputError(f"{name} {value} is invalid; use 1 or more")
    for name, value in seconds.items():
        if not 0 < value < 86400:
            raise RuntimeInputError(f"{name} {value:g} is invalid; use a number of seconds above 0 (and below a day)")
    if not 0 <= port <= 65535:
        raise RuntimeInputError(f"--port {port} is invalid; use 0..65535 (0 = any free port)")
