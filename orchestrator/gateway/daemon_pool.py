"""Daemon connections shared by the gateway's request threads.

A DaemonClient is one DEALER socket and strictly one request at a time, so each thread borrows a
client from the pool for one request and gives it back. A client whose request timed out is closed,
never reused: the late reply would otherwise be read as the answer to its next request.
"""

from __future__ import annotations

import threading
from typing import Any

from orchestrator.daemon.client import DaemonClient, DaemonError
from orchestrator.daemon.transport import DaemonAddress
from protocol import codec
from protocol.codec import ErrorCode

# Error codes after which the socket may hold a stray frame: drop the client.
BROKEN_CODES = frozenset({ErrorCode.UNREACHABLE, ErrorCode.MALFORMED, ErrorCode.TOO_LARGE, ErrorCode.BAD_VERSION})


class DaemonPool:
    """Borrow-and-return DaemonClients to one daemon address."""

    def __init__(self, address: DaemonAddress, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._idle: list[DaemonClient] = []
        self._lock = threading.Lock()

    def request(self, message: codec.Message) -> dict[str, Any]:
        """The daemon's `ok` data for `message`; DaemonError or TransportError otherwise."""
        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = DaemonClient(self.address, self.timeout_s)
        try:
            data = client.request(message)
        except DaemonError as exc:
            if exc.code in BROKEN_CODES:
                client.close()
            else:
                self._give_back(client)
            raise
        except BaseException:
            client.close()
            raise
        self._give_back(client)
        return data

    def _give_back(self, client: DaemonClient) -> None:
        with self._lock:
            self._idle.append(client)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for client in idle:
            client.close()
