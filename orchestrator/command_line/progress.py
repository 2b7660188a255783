"""Render stage events as tqdm bars: stage and phase, step i/n, elapsed, ETA and memory in use.

In a batch several jobs share the view; `labelled(name)` gives a listener that prefixes one
job's lines and bars with its name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

from orchestrator.run.job_hooks import StageEvent
from orchestrator.run.states import StageEventKind
from protocol import codec, stages

GIB = float(1 << 30)


class ProgressView:
    """One bar per stage phase that has steps; one line per stage start, skip and result."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.bar_key: tuple[str, str, str] | None = None

    def __call__(self, event: codec.Message | StageEvent, label: str = "") -> None:
        prefix = f"{label} " if label else ""
        if isinstance(event, StageEvent) and event.kind is StageEventKind.WARNING:
            self._line(f"ltx2: {prefix}{event.detail}")  # warnings show even with --quiet
            return
        if not self.enabled:
            return
        if isinstance(event, StageEvent):
            self._close_bar()
            detail = f" ({event.detail})" if event.detail else ""
            attempt = f" attempt {event.attempt}" if event.attempt > 1 else ""
            self._line(f"{prefix}{event.stage}: {event.kind.value}{attempt}{detail}")
        elif isinstance(event, stages.Progress) and event.phase != stages.JOB_STARTED_PHASE:
            self._progress(event, prefix)
        elif isinstance(event, stages.Heartbeat) and self.bar is not None:
            self.bar.set_postfix_str(memory_text(event.gpu_bytes, event.rss_bytes), refresh=True)

    def labelled(self, label: str) -> Callable[[codec.Message | StageEvent], None]:
        """A listener for one job of several: its lines and bars start with `label`."""
        return lambda event: self(event, label)

    def _progress(self, event: stages.Progress, prefix: str = "") -> None:
        key = (event.id, event.stage, event.phase)
        if event.total <= 0:
            self._close_bar()
            self._line(f"{prefix}{event.stage}: {event.phase}")
            return
        if key != self.bar_key:
            self._close_bar()
            self.bar = tqdm(
                total=event.total,
                # A view that attaches mid-phase (`ltx2 watch`) starts counting from the step it first
                # sees, so the rate covers only steps it watched (it read 129055 step/s otherwise).
                initial=event.step,
                desc=f"{prefix}{event.stage}: {event.phase}",
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
                leave=True,
            )
            self.bar_key = key
        self.bar.n = event.step
        self.bar.set_postfix_str(memory_text(event.gpu_bytes, event.rss_bytes), refresh=False)
        self.bar.refresh()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_key = None, None

    def _line(self, text: str) -> None:
        tqdm.write(text, file=self.stream)

    def close(self) -> None:
        self._close_bar()


def memory_text(gpu_bytes: int, rss_bytes: int) -> str:
    """`gpu 12.3G rss 4.1G` (gpu omitted when no accelerator is in use)."""
    parts = [f"gpu {gpu_bytes / GIB:.1f}G"] if gpu_bytes else []
    parts.append(f"rss {rss_bytes / GIB:.1f}G")
    return " ".join(parts)
