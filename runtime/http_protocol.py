"""uvicorn's HTTP/1.1 protocol with a deadline on request headers.

uvicorn times out idle keep-alive connections but waits forever for the headers of a request that was
started and never finished (slowloris): enough such connections exhaust the file limit and every new client
is reset. Here a connection gets ``header_timeout`` seconds, from when it opens or its previous response
ended, to deliver complete request headers; otherwise it is answered 408 and closed. The body has its own
deadline (``http_io.read_json``), and uvicorn's ``limit_concurrency`` answers 503 past ``max_connections``.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
_TIMEOUT_BODY = (b'{"error": {"message": "request headers not received in time; send the whole request", '
                 b'"type": "invalid_request_error", "param": null, "code": null}}')
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol that answers 408 and closes a connection whose request headers are late."""

    def __init__(self, *args, header_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:  # a request's headers arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn handles a pipelined request, which disarms again
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        log.info("closed a connection from %s: no complete request headers within %g s", self.client,
                 self.header_timeout)
        self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()
