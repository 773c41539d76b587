"""What keeps one client from stalling the others: limits enforced below and around the application.

- `guarded_protocol(limits, on_reject)`: uvicorn's h11 protocol with a connection cap (a connection beyond
  `max_connections` gets 503 at once and is closed, before anything is read), a per-client cap (a client
  address holding `max_connections_per_client` open connections gets 503 for one more, so one client's flood
  leaves room for the others) and a request deadline (a request
  whose headers and body have not all arrived `request_timeout` seconds after its first byte, or after the
  connection opened, gets 408 and is closed: half-sent requests and idle half-open sockets do not pile up).
  Idle keep-alive connections close after uvicorn's `timeout_keep_alive`.
- `AccessLog`: ASGI middleware writing one line per request (client, method, path, status, seconds, bytes
  sent) to the `deltatune.serve.access` logger, and refusing a declared `Content-Length` above
  `max_body_bytes` with 413 before the body is read. Bodies sent without a length are bounded while read
  (server.read_body).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

access_log = logging.getLogger("deltatune.serve.access")


@dataclass(frozen=True)
class Limits:
    """max_body_bytes: a request body larger than this gets 413. max_connections: open connections at most
    (one more gets 503). max_connections_per_client: open connections of one client address at most (one more
    gets 503; None: no such cap, e.g. behind a proxy, where every client has the proxy's address).
    request_timeout: seconds for a request's headers and body to arrive (else 408). keep_alive: seconds an idle
    keep-alive connection stays open."""

    max_body_bytes: int = 2 << 20
    max_connections: int = 1024
    request_timeout: float = 30.0
    keep_alive: float = 5.0
    max_connections_per_client: int | None = 256

    def __post_init__(self) -> None:
        for field in ("max_body_bytes", "max_connections", "max_connections_per_client"):
            value = getattr(self, field)
            if field == "max_connections_per_client" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Limits.{field} must be an integer >= 1, got {value!r}")
        for field in ("request_timeout", "keep_alive"):
            if not getattr(self, field) > 0:
                raise ValueError(f"Limits.{field} must be > 0 seconds, got {getattr(self, field)!r}")


def error_bytes(status: int, reason: str, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 response with OpenAI's error body, written straight to a socket, closing it."""
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else
                                 "invalid_request_error", "param": None, "code": code}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def guarded_protocol(limits: Limits, on_reject: Callable[[int, str], None] = lambda status, code: None) -> type:
    """A uvicorn HTTP protocol class (uvicorn.Config(http=...)) enforcing `limits`; `on_reject(status, code)`
    counts each refusal it makes (the server's /metrics)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_client: dict[str, int] = {}  # open connections of each client address (this server's)
    cap = limits.max_connections_per_client

    class GuardedH11Protocol(H11Protocol):
        _refused = False
        _client: str | None = None
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            peer = transport.get_extra_info("peername")
            client = peer[0] if isinstance(peer, (tuple, list)) and peer else None
            if len(self.connections) >= limits.max_connections:
                return self._refuse(transport, f"the server has {limits.max_connections} connections open, its "
                                    "limit; retry later", "too_many_connections")
            if cap is not None and client is not None and per_client.get(client, 0) >= cap:
                return self._refuse(transport, f"this client has {cap} connections open, its limit; close one or "
                                    "retry later", "too_many_client_connections")
            if client is not None:
                self._client = client
                per_client[client] = per_client.get(client, 0) + 1
            super().connection_made(transport)
            self._arm()

        def _refuse(self, transport, message: str, code: str) -> None:
            self._refused = True
            transport.write(error_bytes(503, "Service Unavailable", message, code))
            if transport.can_write_eof():  # a FIN after the answer; closing on unread request bytes would
                transport.write_eof()  # reset the connection before the client reads the 503
            asyncio.get_event_loop().call_later(1.0, transport.close)
            on_reject(503, code)

        def connection_lost(self, exc) -> None:
            if self._refused:
                return
            if self._client is not None:
                left = per_client.get(self._client, 1) - 1
                if left > 0:
                    per_client[self._client] = left
                else:
                    per_client.pop(self._client, None)
                self._client = None
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
                self._disarm()  # the whole request has arrived (or the connection is closing)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _timed_out(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is None or not self.cycle.response_started:
                self.transport.write(error_bytes(408, "Request Timeout", f"the request did not arrive whole within "
                                                 f"{limits.request_timeout:g} s", "request_timeout"))
            on_reject(408, "request_timeout")
            self.transport.close()  # the application, if it was reading the body, sees a disconnect

    return GuardedH11Protocol


class AccessLog:
    """ASGI middleware: one access line per HTTP request, and 413 for a declared body over the limit."""

    def __init__(self, app, max_body_bytes: int, on_reject: Callable[[int, str], None]) -> None:
        self.app, self.max_body_bytes, self.on_reject = app, max_body_bytes, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, sent = time.perf_counter(), [0], [0]

        async def send_logged(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sent[0] += len(message.get("body", b""))
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                from .server import error_response  # noqa: PLC0415  (server imports this module)

                self.on_reject(413, "body_too_large")
                response = error_response(413, f"the request body has {int(declared)} bytes; at most "
                                          f"{self.max_body_bytes} are accepted", code="body_too_large")
                response.headers["connection"] = "close"
                return await response(scope, receive, send_logged)
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s:%s "%s %s" %d %.3fs %dB', client[0], client[1], scope.get("method"), scope.get("path"),
                            status[0], time.perf_counter() - started, sent[0])
