"""Deliberate failures of the daemon itself, switched on by environment variables (for tests).

services/faults.py breaks workers; this breaks the orchestrator side, so the daemon's own guards
can be tested with real processes and a real supervisord:

- `LTX2_FAULT_EXECUTOR=1` with `LTX2_FAULT_DIR=DIR` - the executor thread raises right after it
  claims a job, as an unexpected error (a sqlite failure, a bug) would, leaving the job RUNNING.
  It fires once per DIR (it creates `DIR/executor-raised` exclusively), so the restarted daemon
  runs the job.

Unset (the normal case), nothing here does anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# The marker that makes the executor fault fire once per fault directory.
EXECUTOR_MARKER = "executor-raised"


class InjectedFault(RuntimeError):
    """Raised on purpose by a fault switch."""


def raise_in_executor_if_requested(environ: Mapping[str, str] = os.environ) -> None:
    """Raise InjectedFault if `LTX2_FAULT_EXECUTOR` asks for it and it has not fired in this fault dir."""
    if environ.get("LTX2_FAULT_EXECUTOR", "") != "1":
        return
    marker = Path(environ["LTX2_FAULT_DIR"]) / EXECUTOR_MARKER
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return
    raise InjectedFault("executor thread killed by LTX2_FAULT_EXECUTOR")
