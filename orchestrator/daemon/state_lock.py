"""One daemon per state dir: an exclusive flock on `<state dir>/daemon.lock`, holding the owner's pid.

Two daemons on one state dir would both run the queued jobs, and each would take the other's live
worker for an orphan of a crash and kill it. The lock is taken before anything else touches the
state dir. The kernel drops it when its holder dies (even by SIGKILL), so a lock left by a dead
daemon is simply taken over; the pid in the file only names the holder in the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_FILE = "daemon.lock"


class StateDirLocked(RuntimeError):
    """Another live process holds the state dir's lock."""


def lock_state_dir(state_dir: Path) -> IO[str]:
    """Take the state dir's lock for this process; keep the returned file open as long as it is needed.

    Raises StateDirLocked naming the holder's pid if another process has it.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / LOCK_FILE
    handle = path.open("a+")  # not "w": truncating would erase the holder's pid before we know it holds
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise StateDirLocked(
            f"another daemon (pid {holder}) is using the state dir {state_dir}; stop it first (its lock: {path})"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
