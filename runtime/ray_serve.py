"""Ray Serve scale-out: the same OpenAI-compatible app, one engine per replica.

    graphopt serve ARTIFACT --ray --replicas N [--ray-address ADDR]

Each replica builds its own :class:`~graphopt.runtime.server.OpenAIServer` (engine thread, scheduler, KV slots)
through ``serve.ingress`` with an app builder, so nothing heavy is pickled; Ray Serve's HTTP proxy spreads
requests over the replicas. Without ``--ray-address`` a local Ray cluster is started on 127.0.0.1 and
stopped on exit. ONNX Runtime threads default to the cores divided among the replicas.

Limits: ``/metrics`` and ``/health`` answer for the replica the proxy picked (Ray exports its own cluster
metrics); the request queue bound (429) is per replica.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import Any

from graphopt.core.errors import GraphoptError
from graphopt.runtime.engine import physical_cores
from graphopt.runtime.server import OpenAIServer, ServerConfig

log = logging.getLogger(__name__)
APP_NAME = "graphopt"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayUnavailable(GraphoptError):
    """Ray Serve is not installed."""


def _import_serve() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RayUnavailable("--ray needs Ray Serve: pip install 'graphopt[ray]' (or 'ray[serve]')") from None
    return ray, serve


def replica_config(config: ServerConfig, replicas: int) -> ServerConfig:
    """Each replica's config: ORT threads split over the replicas unless given."""
    threads = config.llm.threads or max(1, physical_cores() // replicas)
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, threads=threads))


def app_builder(config: ServerConfig) -> Any:
    """A no-argument builder Ray Serve runs on each replica: its own engine and ASGI app."""

    def build_app() -> Any:
        return OpenAIServer(config).app  # its lifespan starts the engine thread

    return build_app


def deployment(config: ServerConfig, replicas: int) -> Any:
    """The bound Ray Serve application: ``replicas`` copies of the OpenAI app."""
    _, serve = _import_serve()
    config = replica_config(config, replicas)

    @serve.deployment(name=APP_NAME, num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=config.llm.max_slots + config.llm.max_queue)
    @serve.ingress(app_builder(config))
    class GraphoptReplica:
        """One engine; all routes come from the ingress app."""

    return GraphoptReplica.bind()


def start(config: ServerConfig, replicas: int, address: str | None = None) -> None:
    """Connect to (or start on loopback) a Ray cluster and run the app on ``config.host:config.port``."""
    if not address:
        # On Linux Ray maps 127.0.0.1 to the machine's network address unless cluster mode is off, as it is by
        # default on macOS/Windows: then every Ray process (they inherit this) binds and talks on loopback only.
        if "ray" in sys.modules and os.environ.get(LOCAL_ONLY_ENV) != "0":
            log.warning("ray was imported before %s=0 was set; the local cluster may use a non-loopback address",
                        LOCAL_ONLY_ENV)
        os.environ[LOCAL_ONLY_ENV] = "0"
    ray, serve = _import_serve()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(deployment(config, replicas), name=APP_NAME, route_prefix="/")
    log.info("Ray Serve: %d replicas of %s on http://%s:%d", replicas, config.artifact, config.host, config.port)


def stop() -> None:
    ray, serve = _import_serve()
    serve.shutdown()
    ray.shutdown()


def serve_ray(config: ServerConfig, replicas: int, address: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut Serve (and a cluster we started) down."""
    start(config, replicas, address)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own (aborting) handlers
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        stop()
