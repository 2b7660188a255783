"""Publishing a finished job into the output folder.

Fault switch for tests, in the style of services/faults.py (real processes, real signals):

- `LTX2_FAULT_PUBLISH_KILL=POINT` - the orchestrator process that publishes a job (`ltx2 generate`,
  `ltx2 batch`, `ltx2 decode` or the daemon) SIGKILLs itself at POINT: `first-file` (right after the
  first file of the publish got its final name), `video` (right after the MP4 got its final name),
  `done` (right after the publish ended, before the job is marked done). With `LTX2_FAULT_DIR=DIR`
  it fires once per DIR (it first creates `DIR/publish-killed-POINT` exclusively), so a daemon that
  supervisord restarts with the same environment goes on; without it, it fires every time.

Unset (the normal case), the switch does nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path

# Where the fault switch can kill the publishing process (see the module docstring).
FAULT_POINTS = ("first-file", "video", "done")


def kill_if_requested(point: str, environ: Mapping[str, str] = os.environ) -> None:
    """SIGKILL this process at `point` when LTX2_FAULT_PUBLISH_KILL asks for it (once per LTX2_FAULT_DIR).

    A kill, not an exception: the test is what a crash, the OOM killer or `kill -9` leaves behind.
    """
    if environ.get("LTX2_FAULT_PUBLISH_KILL") != point:
        return
    if fault_dir := environ.get("LTX2_FAULT_DIR"):
        try:
            marker = Path(fault_dir) / f"publish-killed-{point}"
            descriptor = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return
        os.write(descriptor, str(os.getpid()).encode())
        os.close(descriptor)
    os.kill(os.getpid(), signal.SIGKILL)
