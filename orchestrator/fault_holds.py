"""Deliberate holds of the orchestrator at a named point of a job, for testing races (tests only).

A cancel that arrives between two stages, or while a finished job is being published, happens in a
window of milliseconds; a test cannot aim at it by timing. With this switch the orchestrator itself
stops in that window until the test lets it go, so the race is reproduced with real processes:

- `LTX2_FAULT_HOLD=ENTRY[,ENTRY...]` with `LTX2_FAULT_DIR=DIR`, each ENTRY a POINT (any job) or
  POINT@NAME (only a job whose `--name` is NAME) - the orchestrator (the daemon's executor,
  `ltx2 generate`, `batch` or `decode`) that reaches POINT with such a job writes the job id into
  `DIR/held-ENTRY` and waits until `DIR/release-ENTRY` exists (at most HOLD_LIMIT_S). Each ENTRY
  holds once per DIR (the file is created exclusively), so later jobs pass. Points:
  `before-<stage>`: a job's stage is about to start, after the stage before it succeeded (the worker
  started ahead for it is waiting for GO); `publish`: every stage succeeded, before the point after
  which a cancel is too late (orchestrator.jobdir, `commit_to_finish`); `publishing`: just after it.

Unset (the normal case), nothing here does anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.jobdir import JobDir

# A test that never releases a hold (it failed first) must not leave a daemon stuck for ever.
HOLD_LIMIT_S = 300.0
POLL_S = 0.05


def hold_if_requested(point: str, job: JobDir, environ: Mapping[str, str] = os.environ) -> None:
    """Wait at `point` until the test releases it, if LTX2_FAULT_HOLD names it for this job (once
    per fault dir and entry)."""
    entries = environ.get("LTX2_FAULT_HOLD", "").split(",")
    entry = next((e for e in (point, f"{point}@{job.spec.name}") if e in entries), None)
    if entry is None:
        return
    folder = Path(environ["LTX2_FAULT_DIR"])
    try:
        descriptor = os.open(folder / f"held-{entry}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    os.write(descriptor, job.id.encode())
    os.close(descriptor)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (folder / f"release-{entry}").exists() and time.monotonic() < deadline:
        time.sleep(POLL_S)
