"""The client side of the daemon protocol: one request, one reply, never an endless wait."""

from __future__ import annotations

import zmq

from orchestrator.daemon.transport import DaemonAddress, connect_client, start_hint
from protocol import codec, jobs
from protocol.codec import ErrorCode


class DaemonError(Exception):
    """The daemon answered with an error reply, or did not answer in time; `code` is a
    protocol.codec.ErrorCode value (a plain str when a newer daemon sent one this code lacks)."""

    def __init__(self, message: str, code: str = ErrorCode.UNREACHABLE, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.field = field


class DaemonClient:
    """A connection to the daemon; use as a context manager."""

    def __init__(self, address: DaemonAddress, timeout_s: float) -> None:
        self.address = address
        self.timeout_ms = int(timeout_s * 1000)
        self.context = zmq.Context()
        try:
            self.socket = connect_client(self.context, address)
        except BaseException:  # no daemon listens, or a key cannot be read: nothing is left open
            self.context.term()
            raise

    def request(self, message: codec.Message) -> dict:
        """Send `message`; return the `ok` reply's data or raise DaemonError."""
        self.socket.send(codec.encode(message))
        if not self.socket.poll(self.timeout_ms):
            raise DaemonError(
                f"no reply from the daemon at {self.address.endpoint} within "
                f"{self.timeout_ms / 1000:.0f} s (is it running? start it: {start_hint()})"
            )
        try:
            reply = codec.decode(self.socket.recv())
        except codec.ProtocolError as exc:  # e.g. an older daemon's reply over the frame limit
            raise DaemonError(f"unreadable reply from the daemon: {exc}", exc.code, exc.field) from None
        if isinstance(reply, jobs.Error):
            raise DaemonError(reply.message, reply.code, reply.field)
        if not isinstance(reply, jobs.Ok):
            raise DaemonError(f"unexpected reply type {reply.TYPE!r}", ErrorCode.MALFORMED)
        return reply.data

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()

    def __enter__(self) -> DaemonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
