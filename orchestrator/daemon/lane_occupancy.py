"""Which of the daemon's lanes are running work, so that a free lane's share of the queue is
counted against the lanes free to take it.

A lane claims the oldest queued jobs up to its share of the queue (and `group_size`), so that a
burst of jobs spreads over the lanes instead of filling the first lane's group. Dividing the queue
by every lane undercounts that share whenever other lanes are busy: 16 jobs queued on 2 lanes gave
the first lane 8 and the second, claiming next while the first was busy, 4, so the other 4 became a
third group that paid the fixed cost of a diffusion process again (about 28 s on an H200 in
docs/benchmarks.md, version 9), and on 8 lanes a burst of 64 jobs ran in two rounds instead of one.
Claims are taken one at a time under one lock, which is what makes the count exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class LaneOccupancy:
    """The busy lanes of one daemon (by lane index), shared by its executors."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
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
