"""Keep web pages from driving a server that has no API key (DNS rebinding, cross-site requests).

Without ``--api-key`` a server on loopback trusts whoever can reach it, which includes any web page the user
opens: the browser sends the page's requests to 127.0.0.1. Such a request gives itself away:
- its ``Host`` header names the attacker's domain (DNS rebinding): bound to loopback, only ``localhost``,
  ``127.0.0.1`` and ``[::1]`` are accepted; bound to one address, that address (and the loopback names);
- its ``Origin`` header names another site (a cross-origin fetch or form): refused unless it is the server's own;
- its ``Content-Type`` is not JSON (``text/plain`` and form posts need no CORS preflight): refused with 415.
With an API key none of this applies (a page cannot know the key). Bound to 0.0.0.0/:: the Host check is off
(the server cannot know its names); Origin and Content-Type are still checked.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
WILDCARD = {"0.0.0.0", "::", ""}


def allowed_hosts(bind_host: str) -> set[str] | None:
    """Host header names accepted for a server bound to ``bind_host`` (None: any)."""
    host = bind_host.strip("[]").lower()
    if host in WILDCARD:
        return None
    return LOOPBACK | {host}


def _hostname(value: str) -> str:
    """'example.com:8000' → 'example.com'; '[::1]:8000' → '::1'."""
    try:
        return (urlsplit(f"//{value}").hostname or "").lower()
    except ValueError:
        return ""


class LocalOnly:
    """ASGI middleware: 403 for a foreign Host or Origin, 415 for a non-JSON POST body (see the module doc)."""

    def __init__(self, app: ASGIApp, bind_host: str) -> None:
        self.app = app
        self.hosts = allowed_hosts(bind_host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, param, message = refusal
        log.warning("refused %s %s: %s", scope["method"], scope["path"], message)
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                     "code": None}}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and _hostname(host) not in self.hosts:
            return 403, "host", (f"Host {host[:100]!r} is not this server's address; without --api-key only "
                                 f"{', '.join(sorted(self.hosts))} are accepted (start it with --api-key to serve "
                                 "other names)")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return 403, "origin", (f"cross-origin request from {origin[:100]!r} refused; without --api-key "
                                   "only same-origin requests are served")
        kind = headers.get("content-type")
        if scope["method"] == "POST" and kind is not None and kind.split(";")[0].strip().lower() != "application/json":
            return 415, "content-type", (f"Content-Type {kind[:60]!r} is not supported; send the body as "
                                         "'application/json'")
        return None
