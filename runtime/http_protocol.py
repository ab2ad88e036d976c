"""uvicorn's HTTP/1.1 protocol with a deadline on request headers and a cap on open connections.

uvicorn times out idle keep-alive connections but waits forever for the headers of a request that was
started and never finished (slowloris): enough such connections exhaust the file limit and every new client
is reset. Here a connection gets ``header_timeout`` seconds, from when it opens or its previous response
ended, to deliver complete request headers; otherwise it is answered 408 and closed. A connection that
opens while ``max_connections`` others are open is answered 503 at once (JSON, ``Connection: close``), its
input is discarded, and it is closed after ``LINGER_S`` (or when the client closes first), so open files stay
bounded and the client reads the 503 instead of a reset. The body has its own deadline (``http_io``).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
LINGER_S = 1.0


def _response(status: bytes, message: bytes, kind: bytes) -> bytes:
    body = b'{"error": {"message": "%s", "type": "%s", "param": null, "code": null}}' % (message, kind)
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body))


TIMEOUT_RESPONSE = _response(b"408 Request Timeout", b"request headers not received in time; send the whole request",
                             b"invalid_request_error")
UNAVAILABLE_RESPONSE = _response(b"503 Service Unavailable", b"the server has too many open connections; retry "
                                 b"shortly (--max-connections)", b"server_error")


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol that answers 408 to late request headers and 503 to connections past ``max_connections``."""

    def __init__(self, *args, header_timeout: float, max_connections: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse()
        else:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._refused:  # a refused connection's request is read and dropped
            super().data_received(data)

    def _refuse(self) -> None:
        self._refused = True
        self.connections.discard(self)  # not counted against the cap (it closes within LINGER_S)
        log.info("refused a connection from %s: %d open, --max-connections %d", self.client, len(self.connections),
                 self.max_connections)
        self.transport.write(UNAVAILABLE_RESPONSE)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

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
