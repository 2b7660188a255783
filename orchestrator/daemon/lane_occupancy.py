"""Which of the daemon's lanes are running work, so that a free lane's share of the queue is
counted against the lanes free to take it.

A lane claims the oldest queued jobs up to its share of the queue (and `group_size`), so that a
burst of jobs spreads over the lanes instead of filling the first lane's group. Dividing the queue
by every lane undercounts that share whenever other lanes are busy: 16 jobs queued on 2 lanes made
groups of 8, 4, 2, 1 and 1 (the second lane claimed while the first was busy), each group a
diffusion process paying its fixed cost again (about 28 s on an H200, docs/benchmarks.md version 9).
Simulated with those costs (tests/test_lanes.py), that burst took 71 s instead of one round's
45.5 s, and 64 jobs on 8 lanes 21 groups and 102 s instead of 8 groups and 45.5 s. Claims are
taken one at a time under one lock, which is what makes the count exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class LaneOccupancy:
    """The busy lanes of one daemon (by lane index), shared by its executors."""

    def __init__(self, lanes: int, widest: int | None = None) -> None:
        self.lanes = lanes
        #: the widest lane's context-parallel width (orchestrator.placement.lanes.lane_width; None: a lane sets no
        #: bound), so a narrow lane leaves a wider lane's job queued for it (lanes.runs_here)
        self.widest = widest
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    @contextmanager
    def claiming(self, lane: int) -> Iterator[int]:
        """Hold the claim lock; yields how many lanes are free to take work, `lane` counted among them."""
        with self._lock:
            yield self.lanes - len(self._busy - {lane})

    def mark_busy(self, lane: int) -> None:
        """`lane` took work (call inside `claiming`)."""
        self._busy.add(lane)

    def release(self, lane: int) -> None:
        """`lane` finished its work and may claim again."""
        with self._lock:
            self._busy.discard(lane)
