"""`python -m services.parent_bound PARENT_PID MODULE [ARGS...]`: run a stage module that dies with its parent.

A farm's task (orchestrator.placement.ray_farm) starts the stage process and waits for it. When Ray stops
that task (`ray.cancel(force=True)`), or the node's OOM killer takes it, the task's process dies
without a chance to stop its child; a stage left running would hold the GPU the farm believes
free. So the child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG), before
its heavy imports, and exits at once if the parent died before it could ask.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import runpy
import signal
import sys

# linux/prctl.h
PR_SET_PDEATHSIG = 1
# What a shell reports for a process killed by SIGKILL: the parent is gone, so is the work.
KILLED_EXIT = 128 + signal.SIGKILL


def die_with(parent: int) -> None:
    """Have the kernel SIGKILL this process when `parent` (its parent) exits; exit at once if it
    already has. Also used by the fork server's children on a farm (services.forkserver)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(KILLED_EXIT)


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot, field 22 of /proc/PID/stat), or None if it is
    gone or a zombie: tells a process from a later one that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


@dataclasses.dataclass(frozen=True)
class Watched:
    """A process that is not our parent but whose end we must notice (a worker's orchestrator, when
    a fork server stands between them)."""

    pid: int
    started: int | None

    @classmethod
    def of(cls, pid: int) -> Watched:
        return cls(pid, start_time(pid))

    def is_running(self) -> bool:
        """Still the same process, not ended and not a zombie (a gone one never comes back)."""
        return self.started is not None and start_time(self.pid) == self.started


def main() -> None:
    parent, module, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    die_with(parent)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
