"""Long pauses of Python's cyclic garbage collector, named in the worker's log.

Why: a stage process that compiled its blocks holds millions of Python objects (Dynamo's guards, Inductor's
graphs), and the collector's full passes walk every one of them. While a denoising step runs, the GPU has
work queued and such a pause costs nothing; between two jobs of a group, or before a pass's first step, the
GPU waits for it. At LTX-2.3 1080p the second job of each group process started its first mark 0.17-0.25 s
later than the third (session 19), which a collection would explain; this log line says whether it is.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger("ltx2.worker")

#: Collections at least this long are logged (a 768x512 denoising step takes ~0.28 s on an H100).
LOGGED_PAUSE_S = 0.05


class PauseWatch:
    """A gc callback timing each collection; `pauses` keeps (generation, seconds, objects collected)
    of those that reached LOGGED_PAUSE_S."""

    def __init__(self) -> None:
        self._started = 0.0
        self.pauses: list[tuple[int, float, int]] = []

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        if seconds >= LOGGED_PAUSE_S:
            self.pauses.append((int(info["generation"]), seconds, int(info.get("collected", 0))))
            log.info(
                "gc: a generation-%d collection paused this process %.3f s (%d objects collected)",
                info["generation"],
                seconds,
                info.get("collected", 0),
            )


def watch() -> PauseWatch:
    """Install the watch for this process's life; returns it."""
    pause_watch = PauseWatch()
    gc.callbacks.append(pause_watch)
    return pause_watch
