"""HTTP plumbing for the server: a bounded JSON body reader, disconnect detection, and an SSE response.

A client that goes away must cancel its request at once, streaming or not. Once the body is read, the
ASGI ``receive`` channel only ever yields ``http.disconnect``, so each response races its work against a
task waiting on ``receive``; whichever ends first cancels the other. Cancelling the work closes the
request's output iterator, which aborts the request (its slot is freed at the next engine step).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from graphopt.core.errors import GraphoptError, RequestError

log = logging.getLogger(__name__)
DRAIN_LIMIT = 64 << 20  # read (and drop) at most this much of an oversized body, so the client sees the 400


class ClientGone(Exception):
    """The client closed the connection before its request body arrived (logged as one line, answered 499)."""


async def read_json(request: Request, limit: int, timeout: float = 30.0) -> Any:
    """The request's JSON body. 400 (param "body") over ``limit`` bytes, for non-UTF-8, malformed or unreadable
    JSON (numbers of more than 4300 digits, nesting too deep for the parser, lone surrogates); 408 when the body
    takes more than ``timeout`` s; :class:`ClientGone` when the client leaves while sending it."""
    try:
        raw, size = await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"request body not received within {timeout:g} s; send it at once (the server's "
                           "--body-timeout)", param="body", status=408) from None
    except ClientDisconnect:
        raise ClientGone() from None
    if size > limit:
        raise RequestError(f"request body is {size} bytes, over the server's {limit}-byte limit; send a shorter "
                           "prompt or raise --max-body-bytes", param="body", status=400)
    return parse_json(raw)


async def _read_body(request: Request, limit: int) -> tuple[bytes, int]:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > DRAIN_LIMIT:
            break
    return b"".join(chunks), size


def parse_json(raw: bytes) -> Any:
    """JSON from UTF-8 bytes; RequestError (param "body") for anything Python's json cannot turn into plain text."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"request body is not valid UTF-8 (bad byte at offset {exc.start}); send UTF-8 JSON",
                           param="body") from None
    try:
        body = json.loads(text)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\\ud800") have no UTF-8
    except json.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}", param="body") from None
    except RecursionError:
        raise RequestError("request body is nested too deeply; send a flatter JSON object", param="body") from None
    except UnicodeEncodeError:
        raise RequestError("request body has a lone UTF-16 surrogate (e.g. \"\\ud800\"), which is not text; "
                           "send valid Unicode strings", param="body") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise RequestError(f"request body has a value Python cannot read: {str(exc)[:120]}", param="body") from None
    return body


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[Any]) -> tuple[bool, Any]:
    """Run ``work`` unless the client disconnects first: (True, result) or (False, None) after cancelling it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()


class SSEResponse:
    """``text/event-stream`` of ``data: <json>`` events ending with ``data: [DONE]``; stops on disconnect.

    An error raised by the event source mid-stream is sent as one ``data: {"error": ...}`` event.
    """

    status_code = 200

    def __init__(self, events: AsyncIterator[str], error_event: Callable[[GraphoptError], str],
                 on_close: Callable[[bool], None] | None = None) -> None:
        self.events = events
        self.error_event = error_event
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        completed = False
        try:
            completed, _ = await until_disconnect(receive, self._pump(send))
        except OSError:  # the socket went away while sending
            completed = False
        finally:
            await self.events.aclose()  # aborts whatever the stream had not finished
            if self.on_close is not None:
                self.on_close(completed)

    async def _pump(self, send: Send) -> None:
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
        except GraphoptError as exc:
            log.warning("stream ended with an error: %s", exc)
            await send({"type": "http.response.body", "body": f"data: {self.error_event(exc)}\n\n".encode(),
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
