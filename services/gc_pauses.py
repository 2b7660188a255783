"""Python's cyclic garbage collector in a stage process: its long pauses named in the log, and the imports'
objects kept out of its passes.

Why: a stage process holds millions of Python objects from its imports (torch, diffusers, transformers) and,
once compiled, from Dynamo and Inductor; each full pass of the collector walks every one. While a denoising
step runs the GPU has work queued and a pause costs nothing, but while the process loads, places and compiles
its model the GPU waits for it: at LTX-2.3 1080p on an H100 a diffusion worker's start held nine full
collections of 0.24-0.43 s (2.4 s in all), most of which found fewer than 25 objects to free (session 19,
docs/benchmarks.md version 19). The imports' objects live as long as the process, so they are frozen
(`gc.freeze`) before the work starts, and in the fork server before each fork, as Python's documentation
advises for a process that forks without exec: a child's passes then skip them, and do not write to the
pages it shares with the server.
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


def freeze_imports() -> int:
    """Put every object alive now out of the collector's passes for the process's life; returns how many
    objects are frozen (with those a fork server froze before forking this process)."""
    gc.freeze()
    return gc.get_freeze_count()


def watch() -> PauseWatch:
    """Install the watch for this process's life; returns it."""
    pause_watch = PauseWatch()
    gc.callbacks.append(pause_watch)
    return pause_watch
