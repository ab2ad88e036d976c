"""OpenAI-compatible HTTP server over :class:`AsyncLLM` (Starlette + uvicorn).

    POST /v1/completions, /v1/chat/completions   JSON, or SSE with "stream": true
    GET  /v1/models, /health, /metrics (Prometheus)

Errors use OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field
(named in ``param``), 401 for a missing or wrong API key (only /v1/* needs one), 404 for an unknown model,
400 (param "body") for a body over ``max_body_bytes`` or JSON Python cannot read, 400 for a request with more
prompts than the queue holds (it could never fit), 429 with ``Retry-After`` when the request queue is full, 500 if
the engine fails. A client that disconnects cancels its request and frees its slot at the next step; one that
leaves while sending its body is logged as one line and answered 499 (not an error).
Limits (server flags): request headers within ``header_timeout`` s (else 408 and closed), the body within
``body_timeout`` s (408), at most ``max_connections`` connections open at once (503 past it). Prompts are
tokenized (and chat templates rendered) on a worker thread, never on the event loop. Without an API key,
requests from a foreign Host or Origin, or with a non-JSON Content-Type, are refused (runtime/http_guard.py).
On SIGTERM the server stops accepting, lets in-flight requests finish for ``shutdown_timeout`` seconds, then
cancels the rest (their responses end cleanly with finish_reason "cancelled"); the engine thread stops last.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from graphopt.core.errors import GraphoptError, OverloadedError, RequestError, RuntimeInputError
from graphopt.runtime.async_llm import AsyncLLM
from graphopt.runtime.http_guard import LocalOnly
from graphopt.runtime.http_io import ClientGone, SSEResponse, read_json, until_disconnect
from graphopt.runtime.http_protocol import HeaderTimeoutProtocol
from graphopt.runtime.llm import LLM, RequestOutput, collect_completion
from graphopt.runtime.sequence import Sequence
from graphopt.runtime.metrics import CONTENT_TYPE, ServingMetrics
from graphopt.runtime.openai_format import Responses, error_body, prompt_usage
from graphopt.runtime.openai_protocol import ParsedRequest, generation_defaults, parse_chat, parse_completion
from graphopt.runtime.utility_routes import ThroughputLog, detokenize, tokenize, version
from graphopt.runtime.config import LLMConfig

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything ``graphopt serve`` takes; built once by the CLI (or a test)."""

    artifact: Path
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    llm: LLMConfig = LLMConfig()  # engine, scheduler, speculation
    model_name: str | None = None  # default: the artifact folder's name
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    header_timeout: float = 10.0  # seconds for a connection to deliver complete request headers
    body_timeout: float = 30.0  # seconds for the request body once the headers are in
    max_connections: int = 256  # connections open at once; one more is answered 503 and closed
    log_interval: float = 10.0  # seconds between throughput lines in the log while serving
    generation_config: str = "auto"  # sampling defaults: auto | vllm | none | a folder (openai_protocol.py)


class OpenAIServer:
    """The routes, bound to one LLM; ``app`` is the ASGI application."""

    def __init__(self, config: ServerConfig, llm: LLM | None = None) -> None:
        self.config = config
        self.llm = llm or LLM(config.artifact, config.llm)
        self.model_name = config.model_name or Path(config.artifact).resolve().name
        cache = self.llm.engine.cache
        self.metrics = ServingMetrics(lambda: len(self.llm.scheduler.waiting), lambda: cache.num_active,
                                      cache.max_slots)
        if self.llm.scheduler.prefix is not None:
            self.metrics.watch_prefix_cache(lambda: self.llm.scheduler.prefix.stats)
        self.async_llm = AsyncLLM(self.llm, observer=self.metrics)
        self.started = int(time.time())
        self.defaults = generation_defaults(Path(config.artifact), config.generation_config)
        self._tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="graphopt-tokenize")
        routes = [
            Route("/v1/completions", self._endpoint("completions", self.completions, True), methods=["POST"]),
            Route("/v1/chat/completions", self._endpoint("chat", self.chat, True), methods=["POST"]),
            Route("/v1/models", self._endpoint("models", self.models, True), methods=["GET"]),
            Route("/health", self._endpoint("health", self.health, False), methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/tokenize", self._endpoint("tokenize", self.tokenize, True), methods=["POST"]),
            Route("/detokenize", self._endpoint("detokenize", self.detokenize, True), methods=["POST"]),
            Route("/version", self._endpoint("version", self.version, False), methods=["GET"]),
        ]
        self.throughput = ThroughputLog(self.metrics, lambda: cache.num_active, lambda: len(self.llm.scheduler.waiting),
                                        cache.max_slots, config.log_interval)
        app = Starlette(routes=routes, lifespan=self._lifespan, exception_handlers={HTTPException: self._http_exception})
        self.app = app if config.api_key is not None else LocalOnly(app, config.host)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.async_llm.start()
        log.info("serving %s as %r with %d slots", self.config.artifact, self.model_name, self.config.llm.max_slots)
        logger = asyncio.create_task(self.throughput.run())
        yield
        logger.cancel()
        await self.async_llm.shutdown()
        self._tokenize.shutdown(wait=False, cancel_futures=True)

    # ---- error handling, auth and accounting -------------------------------------------------------------
    def _endpoint(self, name: str, handler: Callable[[Request], Awaitable[Any]], auth: bool):
        async def endpoint(request: Request) -> Any:
            try:
                if auth:
                    self._authorize(request)
                response = await handler(request)
            except ClientGone:
                log.info("client left while sending its request body to %s", request.url.path)
                response = Response(status_code=499)  # nginx's "client closed request": nobody reads it
            except RequestError as exc:
                response = _error(exc.status, str(exc), "invalid_request_error", exc.param, exc.code)
            except OverloadedError as exc:
                response = _error(429, str(exc), "rate_limit_error", code="queue_full")
                response.headers["Retry-After"] = str(RETRY_AFTER_S)
            except RuntimeInputError as exc:
                response = _error(400, str(exc), "invalid_request_error")
            except GraphoptError as exc:
                log.error("request failed: %s", exc)
                self.metrics.on_error()
                response = _error(500, str(exc), "server_error")
            except Exception:  # a bug: log it with its traceback, answer in the API's shape
                log.exception("unexpected error serving %s", request.url.path)
                self.metrics.on_error()
                response = _error(500, "internal server error; see the server log", "server_error")
            self.metrics.http.labels(name, str(response.status_code)).inc()
            return response

        return endpoint

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        """Unknown paths (404) and wrong methods (405) in OpenAI's error shape too."""
        self.metrics.http.labels("other", str(exc.status_code)).inc()
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise RequestError("missing or incorrect API key; send 'Authorization: Bearer KEY' with the key the "
                               "server was started with (--api-key)", status=401, code="invalid_api_key")

    # ---- routes ------------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        if not self.async_llm.alive:
            return _error(503, "the engine thread is not running; restart the server", "server_error")
        return JSONResponse({"status": "ok", "slots_in_use": self.llm.engine.cache.num_active,
                             "queue_length": len(self.llm.scheduler.waiting)})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "graphopt",
                "max_model_len": self.llm.max_seq}
        return JSONResponse({"object": "list", "data": [card]})

    async def tokenize(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes, self.config.body_timeout)
        return JSONResponse(await asyncio.get_running_loop().run_in_executor(
            self._tokenize, tokenize, body, self.llm.tokenizer, self.model_name, self.llm.max_seq))

    async def detokenize(self, request: Request) -> Response:
        body = await read_json(request, self.config.max_body_bytes, self.config.body_timeout)
        return JSONResponse(detokenize(body, self.llm.tokenizer, self.model_name, self.llm.engine.vocab_size))

    async def version(self, request: Request) -> Response:
        return JSONResponse(version())

    async def completions(self, request: Request) -> Any:
        body = await read_json(request, self.config.max_body_bytes, self.config.body_timeout)
        parsed = await self._off_loop(parse_completion, body, self.llm.tokenizer, self.llm.max_seq,
                                      self.llm.engine.vocab_size, self.defaults, self.llm.grammars.check)
        return await self._generate(request, parsed, chat=False)

    async def chat(self, request: Request) -> Any:
        body = await read_json(request, self.config.max_body_bytes, self.config.body_timeout)
        parsed = await self._off_loop(parse_chat, body, self.llm.tokenizer, self.llm.max_seq, self.defaults,
                                      self.llm.grammars.check)
        return await self._generate(request, parsed, chat=True)

    async def _off_loop(self, function: Callable[..., ParsedRequest], *args: Any) -> ParsedRequest:
        """Tokenize and compile grammars on the worker thread: a 1 MB prompt must not stall every other connection."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, function, *args)

    # ---- generation --------------------------------------------------------------------------------------
    async def _generate(self, request: Request, parsed: ParsedRequest, chat: bool) -> Any:
        if parsed.model is not None and parsed.model != self.model_name:
            raise RequestError(f"the model '{parsed.model}' does not exist; this server serves '{self.model_name}'",
                               param="model", status=404, code="model_not_found")
        limit = self.llm.scheduler.config.max_queue
        prompts, params = parsed.requests()
        if len(prompts) > limit:  # would be refused with 429 forever, however idle the server
            raise RequestError(f"this request asks for {len(prompts)} choices (prompts x n), more than the server's "
                               f"queue holds ({limit}); send at most {limit} per request",
                               param="n" if parsed.copies > 1 else "prompt")
        ids, queue = self.async_llm.submit(prompts, params)
        responses = Responses(chat, self.model_name, self.llm.tokenizer, parsed.logprobs)
        outputs = self.async_llm.outputs(ids, queue)
        if parsed.stream:
            return SSEResponse(self._events(parsed, responses, outputs), _error_event)
        done, parts = await until_disconnect(request.receive, _gather(outputs, len(ids)))
        if not done:
            log.info("client went away; cancelled %d request(s)", len(ids))
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        results = [collect_completion(part[-1].seq, part) for part in parts]
        return JSONResponse(responses.final(results, prompt_usage(parsed, [part[-1].seq for part in parts]),
                                            parsed.copies, parsed.n))

    async def _events(self, parsed: ParsedRequest, responses: Responses,
                      outputs: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        seqs: dict[int, Sequence] = {}
        for index in range(len(parsed.prompts) * parsed.copies):
            opening = responses.role_chunk(index)
            if opening is not None:
                yield json.dumps(opening)
        try:
            async for index, out in outputs:
                chunk = responses.chunk(index, out)
                if chunk is not None:
                    yield json.dumps(chunk)
                if out.finished:
                    seqs[index] = out.seq
        finally:
            await outputs.aclose()
        if parsed.include_usage:
            done = [seqs[index] for index in sorted(seqs)]
            yield json.dumps(responses.usage_chunk(prompt_usage(parsed, done), sum(len(s.output_ids) for s in done)))


async def _gather(outputs: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[list[RequestOutput]]:
    parts: list[list[RequestOutput]] = [[] for _ in range(count)]
    try:
        async for index, out in outputs:
            parts[index].append(out)
    finally:
        await outputs.aclose()
    return parts


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def _error_event(exc: GraphoptError) -> str:
    return json.dumps(error_body(str(exc), "server_error"))


def uvicorn_server(server: OpenAIServer, port: int | None = None, log_level: str = "info"):
    """A uvicorn server for ``server.app`` whose shutdown (SIGTERM, SIGINT) drains before closing connections:

    stop listening → let in-flight requests finish for ``shutdown_timeout`` s → cancel the rest (streams end
    with finish_reason "cancelled" and [DONE]) → uvicorn closes connections → the engine thread stops.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for listener in self.servers:
                listener.close()
            await server.async_llm.drain(server.config.shutdown_timeout)
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", [])
            if sig == signal.SIGTERM and sig in captured:  # uvicorn re-raises it after shutdown: after a drained
                captured.remove(sig)  # shutdown the process should exit 0, not die of the signal

    config = server.config
    protocol = functools.partial(HeaderTimeoutProtocol, header_timeout=config.header_timeout,
                                 max_connections=config.max_connections)
    return DrainingServer(uvicorn.Config(server.app, host=config.host, port=config.port if port is None else port,
                                         log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                                         http=protocol, limit_concurrency=config.max_connections + 1))


def serve(config: ServerConfig, llm: LLM | None = None) -> None:
    """Run the server until SIGTERM/SIGINT (uvicorn catches the signals; shutdown drains as above)."""
    uvicorn_server(OpenAIServer(config, llm)).run()
