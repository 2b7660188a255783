"""Deliberate failures for testing recovery, switched on by environment variables.

They make the failure paths of the orchestrator testable with real processes and real signals:

- `LTX2_FAULT_PAUSE=STAGE:PHASE:STEP[,STAGE:PHASE:STEP...]` with `LTX2_FAULT_DIR=DIR` - the first
  worker (of any job) that reports that step of that phase creates `DIR/paused-STAGE.pid` holding
  its pid and sleeps until killed, so a test can SIGKILL it at a known point; each entry fires
  once per DIR (the file is created exclusively), so the retry runs through;
- `LTX2_FAULT_OOM=STAGE:N` - attempts 1..N of the stage raise torch.OutOfMemoryError at the start;
- `LTX2_FAULT_KILL=STAGE:N` - attempts 1..N of the stage SIGKILL themselves at the start, as the
  kernel's OOM killer would;
- `LTX2_FAULT_ENOSPC=STAGE:N` - attempts 1..N of the stage raise OSError(ENOSPC) at the start,
  naming a file in the job directory, as a full disk would (after leaving a half-written temp
  file there, which the worker must remove);
- `LTX2_FAULT_CUDA_AT_IMPORT=MODULE[:hidden]` - the fork server behaves as if importing MODULE had
  initialised CUDA (as torchao and Transformer Engine do on a GPU host): the server reports it
  (unless `:hidden`, which models an initialisation it cannot see) and every worker it forks fails at
  its first accelerator use with torch's own "Cannot re-initialize CUDA in forked subprocess".
- `LTX2_FAULT_FRONT_REFUSE=FILE` - while FILE exists, a starting client front
  (orchestrator.daemon.client_front) refuses to serve, as one whose endpoint another process took
  meanwhile would;
- `LTX2_FAULT_HIDE_PATH=DIR` - in a farm node's environment: the state-dir probe
  (orchestrator.ray_farm) does not see files under DIR, as on a node that does not mount the
  shared storage (nodes of a test cluster all run on one host and see the same files).

Unset (the normal case), nothing here does anything.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path


def _parse(value: str, parts: int) -> list[str] | None:
    fields = value.split(":")
    return fields if len(fields) == parts else None


def inject_at_start(stage: str, attempt: int, environ: Mapping[str, str], job_dir: Path | None = None) -> None:
    """Raise a CUDA OOM or a full disk, or SIGKILL this process, if the environment asks for it."""
    oom = _parse(environ.get("LTX2_FAULT_OOM", ""), 2)
    if oom and oom[0] == stage and attempt <= int(oom[1]):
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by LTX2_FAULT_OOM, attempt {attempt})")
    kill = _parse(environ.get("LTX2_FAULT_KILL", ""), 2)
    if kill and kill[0] == stage and attempt <= int(kill[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    full = _parse(environ.get("LTX2_FAULT_ENOSPC", ""), 2)
    if full and full[0] == stage and attempt <= int(full[1]):
        folder = job_dir or Path.cwd()
        temp = folder / f".{stage}-output.tmp-{os.getpid()}.bin"
        temp.write_bytes(b"\0" * 4096)  # what a write cut short by the full disk leaves
        raise OSError(
            errno.ENOSPC, f"No space left on device (injected by LTX2_FAULT_ENOSPC, attempt {attempt})", str(temp)
        )


def pause_if_requested(stage: str, phase: str, step: int, environ: Mapping[str, str]) -> None:
    """Block forever at a requested step (once per fault dir), after leaving a pid file."""
    entries = [_parse(entry, 3) for entry in environ.get("LTX2_FAULT_PAUSE", "").split(",") if entry]
    if not any(e and e[0] == stage and e[1] == phase and int(e[2]) == step for e in entries):
        return
    marker = Path(environ["LTX2_FAULT_DIR"]) / f"paused-{stage}.pid"
    try:
        descriptor = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    os.write(descriptor, str(os.getpid()).encode())
    os.close(descriptor)
    while True:
        time.sleep(3600)


# The fork server's pid, set in its environment by `initialise_cuda_at_import`: its children know
# they were forked from a process that "initialised CUDA".
CUDA_OWNER_VARIABLE = "LTX2_FAULT_CUDA_OWNER"


def initialise_cuda_at_import(environ: dict[str, str] | os._Environ[str]) -> str:
    """In the fork server after its imports: the module the switch says initialised CUDA ("" when
    unset or hidden); marks the environment so forked children fail as torch would make them."""
    module, _, mode = environ.get("LTX2_FAULT_CUDA_AT_IMPORT", "").partition(":")
    if not module:
        return ""
    environ[CUDA_OWNER_VARIABLE] = str(os.getpid())
    return "" if mode == "hidden" else module


def fail_if_cuda_was_initialised_before_fork(environ: Mapping[str, str]) -> None:
    """At a worker's first accelerator use: raise torch's error if its parent "initialised CUDA"."""
    if environ.get(CUDA_OWNER_VARIABLE) == str(os.getppid()):
        raise RuntimeError(
            "Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you must use "
            "the 'spawn' start method (injected by LTX2_FAULT_CUDA_AT_IMPORT)"
        )


def hides_path(path: str, environ: Mapping[str, str]) -> bool:
    """Whether `LTX2_FAULT_HIDE_PATH` hides `path` from this node's state-dir probe."""
    hidden = environ.get("LTX2_FAULT_HIDE_PATH", "")
    return bool(hidden) and Path(path).is_relative_to(hidden)


def front_refusal(environ: Mapping[str, str]) -> str:
    """In a starting client front: why it must refuse to start ("" unless the switch's file exists)."""
    path = environ.get("LTX2_FAULT_FRONT_REFUSE", "")
    return f"refused while {path} exists (LTX2_FAULT_FRONT_REFUSE)" if path and Path(path).exists() else ""
