"""uvicorn's h11 protocol with the bounds uvicorn lacks: header and body read time, and a connection cap
whose refusal (like uvicorn's own 400 for a request that is not HTTP) is OpenAI's JSON.

uvicorn bounds only the idle time between requests (`timeout_keep_alive`, passed through from
`http.keep_alive_timeout_s`), and any byte received resets it: a client sending one byte every few
seconds held a connection for ever, in its headers or in a body (uvicorn/uvicorn#157 asks for these
timeouts; its `limit_concurrency` answers plain text). Here, per connection:

- while it waits for a request's line and headers (from its opening, or from the end of the previous
  response), `http.header_timeout_s` runs; then the connection is closed (no request, no answer);
- once the headers arrived, `http.body_timeout_s` runs until the body has. The create endpoint, the
  one that reads bodies, answers 408 itself at that bound (app.read_fields); a connection still
  sending a body nobody reads is closed once its answer is out;
- a connection opened while `http.max_connections` are open is answered 503 (Retry-After) and closed.

The state of a request is h11's (`their_state`: IDLE waiting for headers, SEND_BODY, DONE), read
after each batch of events uvicorn handles.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from config.settings import HttpSettings

# Retry-After of a refused connection: connections are short, a second frees some.
BUSY_RETRY_S = 1


def error_body(message: str, kind: str, code: str) -> bytes:
    """OpenAI's error object, as app.ApiError writes it (made here without a request)."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


async def over_capacity(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The ASGI app a connection over the cap gets instead of the gateway: 503, then close."""
    message = "the gateway has too many open connections (http.max_connections); retry shortly"
    body = error_body(message, "server_error", "too_many_connections")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(BUSY_RETRY_S).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BoundedH11Protocol(H11Protocol):
    """One connection; `limits` is set on the subclass `protocol_for` makes."""

    limits: HttpSettings

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_overdue = False
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = over_capacity
        self._follow_request()

    def handle_events(self) -> None:
        super().handle_events()
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_overdue and self.conn.their_state is h11.SEND_BODY:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not an HTTP request, as OpenAI's JSON instead of text."""
        body = error_body(f"not a valid HTTP request: {msg}", "invalid_request_error", "invalid_http")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _follow_request(self) -> None:
        """Start or stop each clock from where the current request is."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_overdue)
        elif self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)
        elif self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer, self._body_overdue = None, False

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:
            self._close()

    def _body_late(self) -> None:
        """The body is overdue: close now if the answer is out, else once it is (the app may send 408)."""
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY:
            return
        self._body_overdue = True
        if self.cycle is None or self.cycle.response_complete:
            self._close()

    def _close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None


def protocol_for(limits: HttpSettings) -> type[BoundedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to the gateway's `[http]` limits."""
    return type("GatewayProtocol", (BoundedH11Protocol,), {"limits": limits})
