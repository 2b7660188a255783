"""The edge of every stage worker: arguments, the ZeroMQ link, heartbeats and exit codes.

A worker is `python -m services.<stage> --job-dir DIR [--endpoint E] [--attempt N] [--plan JSON]`.
With an endpoint it connects a DEALER socket, says READY and waits for GO before the stage does
anything heavy (DESIGN.md rule 5). Without one it runs at once and logs progress to stderr, which
is handy for running a stage by hand. Errors are caught once, here, and turned into the exit
codes of protocol.errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import zmq

from protocol import codec, stages
from protocol.errors import ExitCode, InvalidInput, StageError
from protocol.files import JOB_FILE, Stage
from protocol.spec import JobSpec
from services import faults

log = logging.getLogger("ltx2.worker")
# A prestarted worker may wait for GO through a whole diffusion run (15 min on a Thor at 1080p);
# it gives up after a day, or at once when its orchestrator dies (it is then re-parented).
GO_TIMEOUT_S = 86400.0
# Queued progress messages are dropped after this long if the orchestrator stopped reading, so a
# dead orchestrator can never keep a finished worker from exiting.
LINGER_MS = 2000


@dataclasses.dataclass
class WorkerContext:
    """What a stage function receives: its inputs and a way to report progress."""

    stage: Stage
    job_dir: Path
    spec: JobSpec
    job: dict[str, Any]
    plan: dict[str, Any]
    attempt: int
    reporter: Reporter

    @property
    def model_root(self) -> Path:
        """The diffusers-layout model folder the orchestrator resolved for this job."""
        return Path(self.job["model_path"])

    def progress(self, phase: str, step: int = 0, total: int = 0) -> None:
        """Report that `phase` started (step 0) or finished `step` of `total`."""
        self.reporter.progress(phase, step, total)
        faults.pause_if_requested(self.stage.value, phase, step, os.environ)


class Reporter:
    """Sends progress and heartbeats; thread-safe because the heartbeat runs on its own thread."""

    def __init__(self, stage: Stage, job_id: str, socket: zmq.Socket | None) -> None:
        self.stage = stage
        self.job_id = job_id
        self.socket = socket
        self._lock = threading.Lock()

    def send(self, message: codec.Message) -> None:
        """Send one message (no-op without a socket)."""
        if self.socket is None:
            return
        with self._lock:
            self.socket.send(codec.encode(message))

    def progress(self, phase: str, step: int, total: int) -> None:
        gpu, rss = memory_in_use()
        log.info("%s: %s %d/%d", self.stage.value, phase, step, total)
        self.send(stages.Progress(self.job_id, self.stage.value, phase, step, total, gpu, rss))

    def start_heartbeat(self, interval_s: float) -> None:
        """Send heartbeats every `interval_s` until the process exits (a daemon thread)."""

        def beat() -> None:
            while True:
                time.sleep(interval_s)
                gpu, rss = memory_in_use()
                self.send(stages.Heartbeat(self.job_id, self.stage.value, gpu, rss))

        threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def memory_in_use() -> tuple[int, int]:
    """(accelerator bytes allocated by torch, resident host bytes) right now."""
    gpu = 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = int(torch.cuda.memory_allocated())
    try:
        with open("/proc/self/statm") as handle:
            rss = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = 0
    return gpu, rss


def peak_memory() -> tuple[int, int]:
    """(peak accelerator bytes, peak resident host bytes) of this process."""
    gpu = 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = int(torch.cuda.max_memory_allocated())
    return gpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_args(stage: Stage, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {stage.module}", description=f"Run the {stage.value} stage.")
    parser.add_argument("--job-dir", type=Path, required=True, help="job directory holding job.json")
    parser.add_argument("--endpoint", default="", help="orchestrator ZeroMQ endpoint (omit to run standalone)")
    parser.add_argument("--attempt", type=int, default=1, help="attempt number, for reports")
    parser.add_argument("--plan", default="{}", help="JSON object: the memory plan for this attempt")
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="seconds between heartbeats")
    return parser.parse_args(argv)


def run_worker(stage: Stage, work: Callable[[WorkerContext], list[str]], argv: list[str] | None = None) -> NoReturn:
    """Run one stage function as a process and exit with its code; never returns."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(stage, argv)
    started = time.monotonic()
    context = zmq.Context()
    socket = None
    job_id = ""
    code = ExitCode.OTHER
    try:
        spec, job = read_job(args.job_dir)
        job_id = str(job["id"])
        if args.endpoint:
            socket = connect(context, args.endpoint)
        reporter = Reporter(stage, job_id, socket)
        if socket is not None:
            wait_for_go(reporter, socket, args.attempt)
        reporter.start_heartbeat(args.heartbeat_s)
        faults.inject_at_start(stage.value, args.attempt, os.environ)
        ctx = WorkerContext(stage, args.job_dir, spec, job, json.loads(args.plan), args.attempt, reporter)
        outputs = work(ctx)
        gpu, rss = peak_memory()
        reporter.send(stages.Done(job_id, stage.value, outputs, time.monotonic() - started, gpu, rss))
        code = ExitCode.OK
    except BaseException as exc:  # the process edge: every failure becomes an exit code
        code = exit_code_for(exc)
        traceback.print_exc()
        if socket is not None:
            Reporter(stage, job_id, socket).send(stages.Failed(job_id, stage.value, int(code), summarize(exc)))
    finally:
        if socket is not None:
            socket.close(linger=LINGER_MS)
        context.term()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))  # skip interpreter teardown: the OS frees the memory faster than Python


def read_job(job_dir: Path) -> tuple[JobSpec, dict[str, Any]]:
    """The validated spec and the whole job record from job.json."""
    try:
        job = json.loads((job_dir / JOB_FILE).read_text())
        return JobSpec.from_dict(job["spec"]), job
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidInput(f"cannot read {job_dir / JOB_FILE}: {exc}") from exc


def connect(context: zmq.Context, endpoint: str) -> zmq.Socket:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, LINGER_MS)
    socket.connect(endpoint)
    return socket


def wait_for_go(reporter: Reporter, socket: zmq.Socket, attempt: int) -> None:
    """Say READY, then block until GO arrives (or give up if the orchestrator never answers)."""
    parent = os.getppid()
    reporter.send(stages.Ready(reporter.job_id, reporter.stage.value, attempt, os.getpid()))
    deadline = time.monotonic() + GO_TIMEOUT_S
    while time.monotonic() < deadline and os.getppid() == parent:
        if socket.poll(timeout=1000):
            message = codec.decode(socket.recv())
            if isinstance(message, stages.Go):
                return
    raise TimeoutError("no GO from the orchestrator (it stopped or never answered)")


def exit_code_for(exc: BaseException) -> ExitCode:
    """Classify an exception into a worker exit code (CUDA OOM without importing torch here)."""
    if isinstance(exc, StageError):
        return exc.exit_code
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return ExitCode.OUT_OF_MEMORY
    return ExitCode.OTHER


def summarize(exc: BaseException) -> str:
    """One line for reports; the full traceback goes to the worker log."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]
