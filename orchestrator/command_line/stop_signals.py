"""Ctrl-C and SIGTERM for the embedded orchestrator (`ltx2 generate`, `decode`, `batch`).

A KeyboardInterrupt raised wherever the main thread happens to be would skip the code that stops
the stage worker, which runs in its own session (the terminal's Ctrl-C never reaches it) and
would go on holding the GPU. Instead the signal only records a stop request; the follower asks
for it between messages, stops the worker (SIGTERM, SIGKILL after the grace period), and the
policy ends the job as interrupted: back to QUEUED, resumable.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

from protocol.errors import Failure

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopOnSignals:
    """While entered, SIGINT and SIGTERM set a flag instead of raising; `reason` reports it."""

    def __init__(self) -> None:
        self.stopped = threading.Event()
        self.previous: dict[int, object] = {}

    def reason(self) -> Failure | None:
        """INTERRUPTED once a signal came, else None (a JobHooks.should_stop)."""
        return Failure.INTERRUPTED if self.stopped.is_set() else None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.stopped.set()

    def __enter__(self) -> StopOnSignals:
        for sig in HANDLED:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
