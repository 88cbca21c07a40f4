"""uvicorn's HTTP/1.1 protocol with the two bounds it lacks against slow or numerous clients.

uvicorn times out idle keep-alive connections, but a connection that sends part of a request head
and stalls is held forever, and it accepts any number of connections. Here a client has
`header_timeout_s` from connecting (or from its previous response) to finish a request's headers
(then 408 and close), and a connection beyond `max_connections` gets a 503 at once and is closed.
Both answers carry OpenAI's error envelope.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

# A refused connection is closed this long after its answer, reading (and dropping) what the client
# still sends: closing with unread data would reset the connection and could lose the answer.
_LINGER_S = 1.0


def _raw_response(status: int, reason: str, message: str, code: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a request-head deadline and a connection limit (class attributes, set by
    `guarded_protocol`)."""

    header_timeout_s: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport) -> None:
        self._header_timer = None
        self._head_bytes = 0
        self._refused = len(self.connections) >= self.max_connections
        if self._refused:  # answered without parsing anything, and never counted as a connection
            self.transport = transport
            message = f"the server has {len(self.connections)} connections open, its limit; retry shortly"
            transport.write(_raw_response(503, "Service Unavailable", message, "too_many_connections", 1))
            self._linger = self.loop.call_later(_LINGER_S, transport.close)
            return
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._header_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head was parsed: the deadline is met
            self._disarm()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm()  # the next request's head is due within the timeout too (keep-alive)
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        if self._refused:
            self._linger.cancel()
            return
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes:  # a client mid-request gets told; an idle one is just closed
            message = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(_raw_response(408, "Request Timeout", message, "header_timeout"))
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's `http=` with these bounds."""
    return type("DitserveH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})
