"""Named fault points: every deliberate failure the tests switch on, in one place.

Recovery is tested with real processes and real signals (a worker SIGKILLed mid-stage, a daemon whose
executor thread dies, a publish cut short), so the failures have to happen inside the product's own
processes. Product code only marks where: a one-line `fault_point(NAME, **context)` call. What may
happen there, which environment variable arms it and which marker files it leaves all live here, so
no product module carries a test-only branch, and unset (the normal case) a point costs a table
lookup and an environment lookup and does nothing. Torch-free: the orchestrator and the workers
both import it; the one point that raises torch's error takes torch from the worker that fires it.

Points (where each fires, what arms it, what it does):

- `worker.started` (services/runtime.py: a stage worker got GO, before the stage runs):
  `LTX2_FAULT_OOM=STAGE:N` - attempts 1..N of the stage raise torch.OutOfMemoryError;
  `LTX2_FAULT_KILL=STAGE:N` - attempts 1..N SIGKILL themselves, as the kernel's OOM killer would;
  `LTX2_FAULT_ENOSPC=STAGE:N` - attempts 1..N leave a half-written temp file in the job directory
  (which the worker must remove) and raise OSError(ENOSPC) naming it, as a full disk would.
- `worker.progress` (services/runtime.py: each progress report of a worker):
  `LTX2_FAULT_PAUSE=STAGE:PHASE:STEP[,STAGE:PHASE:STEP...]` with `LTX2_FAULT_DIR=DIR` - the first
  worker (of any job) that reports that step of that phase creates `DIR/paused-STAGE.pid` holding its
  pid and sleeps until killed, so a test can SIGKILL it at a known point; each entry fires once per
  DIR (the file is created exclusively), so the retry runs through.
- `forkserver.imported` (services/forkserver.py: the fork server imported the stage modules):
  `LTX2_FAULT_CUDA_AT_IMPORT=MODULE[:hidden]` - the server behaves as if importing MODULE had
  initialised CUDA (as torchao and Transformer Engine do on a GPU host): the point answers MODULE,
  which the server reports (unless `:hidden`, an initialisation it cannot see), and it sets
  `LTX2_FAULT_CUDA_OWNER` to the server's pid, which arms the next point in every worker it forks.
- `worker.first_device_use` (services/model_loading.py: a worker picks its device):
  `LTX2_FAULT_CUDA_OWNER=PID` (set by `forkserver.imported`) - a worker whose parent is PID fails with
  torch's own "Cannot re-initialize CUDA in forked subprocess".
- `front.starting` (orchestrator/daemon/client_front.py: a client front, before it binds):
  `LTX2_FAULT_FRONT_REFUSE=FILE` - while FILE exists the point answers why the front refuses to
  serve, as one whose endpoint another process took meanwhile would.
- `farm.probe_read` (orchestrator/placement/ray_farm.py: a node reads the state-dir probe the head wrote):
  `LTX2_FAULT_HIDE_PATH=DIR`, in the node's environment - files under DIR raise FileNotFoundError, as
  on a node that does not mount the shared storage (nodes of a test cluster share one host's files).
- `executor.claimed` (orchestrator/daemon/executor.py: the executor thread claimed a job):
  `LTX2_FAULT_EXECUTOR=1` with `LTX2_FAULT_DIR=DIR` - the thread raises InjectedFault, as an
  unexpected error (a sqlite failure, a bug) would, leaving the job RUNNING; once per DIR (it creates
  `DIR/executor-raised` exclusively), so the restarted daemon runs the job.
- `job.before_stage`, `job.before_publish`, `job.publishing` (orchestrator/run/pipeline.py: a job's stage
  is about to start after the one before it succeeded, its worker started ahead waiting for GO; every
  stage succeeded, before the point after which a cancel is too late; just after that point):
  `LTX2_FAULT_HOLD=ENTRY[,ENTRY...]` with `LTX2_FAULT_DIR=DIR`, each ENTRY a HOLD (any job) or
  HOLD@NAME (only a job whose `--name` is NAME), HOLD being `before-<stage>`, `publish` or
  `publishing` - the orchestrator (the daemon's executor, `ltx2 generate`, `batch` or `decode`)
  writes the job id into `DIR/held-ENTRY` and waits until `DIR/release-ENTRY` exists (at most
  HOLD_LIMIT_S), so a test lands a cancel in a window of milliseconds. Each ENTRY holds once per DIR.
- `publish.first_file`, `publish.video`, `publish.done` (orchestrator/run/publishing.py: the first file
  of a publish got its final name; the MP4 did; the publish ended, before the job is marked done):
  `LTX2_FAULT_PUBLISH_KILL=first-file|video|done` - the publishing process (`ltx2 generate`, `batch`,
  `decode` or the daemon) SIGKILLs itself there. With `LTX2_FAULT_DIR=DIR` once per DIR (it first
  creates `DIR/publish-killed-POINT` exclusively), so a daemon supervisord restarts goes on; without
  it, every time.

A Ray farm's head passes its switches on to its tasks (`fault_switches`), so a test arms a remote
worker as it arms a local one.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Every switch is an environment variable with this prefix, which is what a farm forwards.
SWITCH_PREFIX = "LTX2_FAULT_"
# Marker files (once per fault dir) go here.
FAULT_DIR_VARIABLE = "LTX2_FAULT_DIR"
# The fork server's pid, set in its environment by `forkserver.imported`: its children know they were
# forked from a process that "initialised CUDA".
CUDA_OWNER_VARIABLE = "LTX2_FAULT_CUDA_OWNER"
# The marker that makes the executor fault fire once per fault directory.
EXECUTOR_MARKER = "executor-raised"
# Where LTX2_FAULT_PUBLISH_KILL can kill the publishing process, in publishing order.
PUBLISH_KILL_POINTS = ("first-file", "video", "done")
# A test that never releases a hold (it failed first) must not leave a daemon stuck for ever.
HOLD_LIMIT_S = 300.0
# A released job goes on within 50 ms, nothing beside a stage; each look is one file check.
HOLD_POLL_S = 0.05


class InjectedFault(RuntimeError):
    """Raised on purpose by a fault point."""


@dataclasses.dataclass(frozen=True)
class Point:
    """A named place in the product: the variables that arm it and what it then does."""

    variables: tuple[str, ...]  #: any of them set and non-empty arms the point
    behaviour: Callable[..., str | None]  #: called with the call site's context; may answer a text


def fault_point(name: str, **context: Any) -> str:
    """Do what the switches ask at point `name` (raise, SIGKILL, block); returns what the point
    answers (`forkserver.imported`, `front.starting`), "" otherwise. A name not in POINTS is a
    KeyError, so a misspelt point fails the first time it is reached rather than never firing."""
    point = POINTS[name]
    if not any(os.environ.get(variable) for variable in point.variables):
        return ""
    return point.behaviour(**context) or ""


def fault_switches() -> dict[str, str]:
    """The switches set in this process's environment, for a process started elsewhere (a Ray task)
    to obey the same."""
    return {key: value for key, value in os.environ.items() if key.startswith(SWITCH_PREFIX)}


def _parse(value: str, parts: int) -> list[str] | None:
    fields = value.split(":")
    return fields if len(fields) == parts else None


def _create_marker(path: Path, content: str) -> bool:
    """Create `path` holding `content` unless it exists: False when it did (the fault already fired)."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.write(descriptor, content.encode())
    os.close(descriptor)
    return True


def _fail_at_start(*, stage: str, attempt: int, job_dir: Path | None = None) -> None:
    """Raise a CUDA OOM or a full disk, or SIGKILL this process, if the environment asks for it."""
    oom = _parse(os.environ.get("LTX2_FAULT_OOM", ""), 2)
    if oom and oom[0] == stage and attempt <= int(oom[1]):
        # torch's own error, taken from the worker that fires this point (it imported torch before GO):
        # protocol/ never imports torch, so the orchestrator stays free of it.
        torch = sys.modules["torch"]
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by LTX2_FAULT_OOM, attempt {attempt})")
    kill = _parse(os.environ.get("LTX2_FAULT_KILL", ""), 2)
    if kill and kill[0] == stage and attempt <= int(kill[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    full = _parse(os.environ.get("LTX2_FAULT_ENOSPC", ""), 2)
    if full and full[0] == stage and attempt <= int(full[1]):
        folder = job_dir or Path.cwd()
        temp = folder / f".{stage}-output.tmp-{os.getpid()}.bin"
        temp.write_bytes(b"\0" * 4096)  # what a write cut short by the full disk leaves
        raise OSError(
            errno.ENOSPC, f"No space left on device (injected by LTX2_FAULT_ENOSPC, attempt {attempt})", str(temp)
        )


def _pause(*, stage: str, phase: str, step: int) -> None:
    """Block forever at a requested step (once per fault dir), after leaving a pid file."""
    entries = [_parse(entry, 3) for entry in os.environ["LTX2_FAULT_PAUSE"].split(",") if entry]
    if not any(e and e[0] == stage and e[1] == phase and int(e[2]) == step for e in entries):
        return
    if not _create_marker(Path(os.environ[FAULT_DIR_VARIABLE]) / f"paused-{stage}.pid", str(os.getpid())):
        return
    while True:
        time.sleep(3600)


def _initialise_cuda_at_import() -> str:
    """The module the switch says initialised CUDA ("" when hidden); marks the environment so forked
    children fail as torch would make them."""
    module, _, mode = os.environ["LTX2_FAULT_CUDA_AT_IMPORT"].partition(":")
    if not module:
        return ""
    os.environ[CUDA_OWNER_VARIABLE] = str(os.getpid())
    return "" if mode == "hidden" else module


def _fail_if_cuda_was_initialised_before_fork() -> None:
    """Raise torch's error if this worker's parent "initialised CUDA"."""
    if os.environ[CUDA_OWNER_VARIABLE] == str(os.getppid()):
        raise RuntimeError(
            "Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, you must use "
            "the 'spawn' start method (injected by LTX2_FAULT_CUDA_AT_IMPORT)"
        )


def _front_refusal() -> str:
    """Why a starting client front must refuse ("" unless the switch's file exists)."""
    path = os.environ["LTX2_FAULT_FRONT_REFUSE"]
    return f"refused while {path} exists (LTX2_FAULT_FRONT_REFUSE)" if Path(path).exists() else ""


def _hide_path(*, path: str) -> None:
    """Make the probe file invisible to this node when it lies under LTX2_FAULT_HIDE_PATH."""
    if Path(path).is_relative_to(os.environ["LTX2_FAULT_HIDE_PATH"]):
        raise FileNotFoundError(f"{path} (hidden by LTX2_FAULT_HIDE_PATH)")


def _raise_in_executor() -> None:
    """Raise InjectedFault unless it already fired in this fault dir."""
    if os.environ["LTX2_FAULT_EXECUTOR"] != "1":
        return
    if _create_marker(Path(os.environ[FAULT_DIR_VARIABLE]) / EXECUTOR_MARKER, ""):
        raise InjectedFault("executor thread killed by LTX2_FAULT_EXECUTOR")


def _hold(hold: str, *, job_id: str, job_name: str) -> None:
    """Wait until the test releases `hold`, if LTX2_FAULT_HOLD names it for this job (once per fault
    dir and entry)."""
    entries = os.environ["LTX2_FAULT_HOLD"].split(",")
    entry = next((e for e in (hold, f"{hold}@{job_name}") if e in entries), None)
    if entry is None:
        return
    folder = Path(os.environ[FAULT_DIR_VARIABLE])
    if not _create_marker(folder / f"held-{entry}", job_id):
        return
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (folder / f"release-{entry}").exists() and time.monotonic() < deadline:
        time.sleep(HOLD_POLL_S)


def _hold_before_stage(*, job_id: str, job_name: str, stage: str) -> None:
    """The hold `before-<stage>`: the hold names the stage, the call site passes it."""
    _hold(f"before-{stage}", job_id=job_id, job_name=job_name)


def _kill_publisher(where: str) -> None:
    """SIGKILL this process when LTX2_FAULT_PUBLISH_KILL names `where` (once per LTX2_FAULT_DIR, if set).

    A kill, not an exception: the test is what a crash, the OOM killer or `kill -9` leaves behind.
    """
    if os.environ["LTX2_FAULT_PUBLISH_KILL"] != where:
        return
    fault_dir = os.environ.get(FAULT_DIR_VARIABLE)
    if fault_dir and not _create_marker(Path(fault_dir) / f"publish-killed-{where}", str(os.getpid())):
        return
    os.kill(os.getpid(), signal.SIGKILL)


POINTS: dict[str, Point] = {
    "worker.started": Point(("LTX2_FAULT_OOM", "LTX2_FAULT_KILL", "LTX2_FAULT_ENOSPC"), _fail_at_start),
    "worker.progress": Point(("LTX2_FAULT_PAUSE",), _pause),
    "forkserver.imported": Point(("LTX2_FAULT_CUDA_AT_IMPORT",), _initialise_cuda_at_import),
    "worker.first_device_use": Point((CUDA_OWNER_VARIABLE,), _fail_if_cuda_was_initialised_before_fork),
    "front.starting": Point(("LTX2_FAULT_FRONT_REFUSE",), _front_refusal),
    "farm.probe_read": Point(("LTX2_FAULT_HIDE_PATH",), _hide_path),
    "executor.claimed": Point(("LTX2_FAULT_EXECUTOR",), _raise_in_executor),
    "job.before_stage": Point(("LTX2_FAULT_HOLD",), _hold_before_stage),
    "job.before_publish": Point(("LTX2_FAULT_HOLD",), functools.partial(_hold, "publish")),
    "job.publishing": Point(("LTX2_FAULT_HOLD",), functools.partial(_hold, "publishing")),
    "publish.first_file": Point(("LTX2_FAULT_PUBLISH_KILL",), functools.partial(_kill_publisher, "first-file")),
    "publish.video": Point(("LTX2_FAULT_PUBLISH_KILL",), functools.partial(_kill_publisher, "video")),
    "publish.done": Point(("LTX2_FAULT_PUBLISH_KILL",), functools.partial(_kill_publisher, "done")),
}
