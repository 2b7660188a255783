"""Read and signal processes that are not this process's children, through /proc.

A worker forked by the fork server is the server's child, not ours: once the server is gone, the
only handles left on the worker are its pid and its session (workers call setsid, so the session,
the process group and the pid share one number). A pid can be reused, so a process is only
signalled when its start time still matches the one recorded when it was forked.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger("ltx2.processes")
# A SIGKILLed process is gone within milliseconds; one stuck in the kernel (a GPU driver call,
# a dead NFS mount) may take long. Bounded, so nothing waits forever on such a process.
KILL_WAIT_S = 10.0
# Index of the start time in /proc/PID/stat's fields after the command name (field 22 of the file).
_START_TIME_FIELD = 19


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When `pid` started, in clock ticks after boot (tells a process from a later one with its pid)."""
    fields = _stat(pid)
    return int(fields[_START_TIME_FIELD]) if fields else None


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie has freed everything but its pid)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def kill_session(pid: int, started: int | None) -> None:
    """SIGKILL the session led by `pid` (a worker and anything it started) and wait until it is dead.

    Nothing is signalled if `pid` now belongs to another process (its start time differs from
    `started`). If `pid` has no process any more, its process group may still hold helpers the
    worker started: the kernel does not hand out a pid that is still a group's id, so signalling
    the group reaches only those.
    """
    current = start_time(pid)
    if current is not None and current != started:
        return
    targets = [os.killpg] if current is None else [os.killpg, os.kill]  # kill: it may not have called setsid yet
    for send in targets:
        try:
            send(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + KILL_WAIT_S
    while is_running(pid):
        if time.monotonic() > deadline:
            log.warning("process %d is still running %.0f s after SIGKILL", pid, KILL_WAIT_S)
            return
        time.sleep(0.02)


def kill_orphan(pid: int, job_dir: str) -> None:
    """SIGKILL a stage worker that a dead orchestrator left running for the job in `job_dir`, if `pid` is
    still that worker (not a reused pid), and wait until it is gone.

    A worker's stdout is its log file inside the job directory, whether it was forked or exec'd,
    which tells it apart from an unrelated process that reused the pid.
    """
    if pid <= 0:
        return
    try:
        stdout = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return
    if not stdout.startswith(job_dir):
        return
    log.warning("killing orphaned worker %d of %s", pid, job_dir)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + KILL_WAIT_S
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
