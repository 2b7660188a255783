"""The edge of every stage worker: arguments, the ZeroMQ link, heartbeats and exit codes.

A worker is `python -m services.<stage> --job-dir DIR [--endpoint E] [--attempt N] [--plan JSON]`.
With an endpoint it connects a DEALER socket, says READY and waits for GO before the stage does
anything heavy (DESIGN.md rule 5). Without one it runs at once and logs progress to stderr, which
is handy for running a stage by hand. Errors are caught once, here, and turned into the exit
codes of protocol.errors.

`--job-dir` may be repeated: the worker then runs the stage for a *group* of jobs in one process
(stage-major scheduling), so each model is loaded once for the group; stage functions keep what
they loaded in `WorkerContext.shared`. Each job gets its own Done or Failed message. A job whose
input is invalid fails alone and the group goes on; any other error ends the process, and the
orchestrator runs the jobs this process did not finish one by one.
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
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NoReturn

import zmq

from protocol import codec, cuda_mps, stages
from protocol.errors import EnvironmentFailure, ExitCode, InvalidInput, exit_code_of, is_no_space
from protocol.fault_points import fault_point
from protocol.files import JOB_FILE, Stage
from protocol.job_record import JobRecordError
from protocol.spec import JobSpec
from protocol.stage_request import StageRequest, read_stage_request
from protocol.stages import WORKER_CURVE_ENV
from services import gc_pauses, parent_bound

log = logging.getLogger("ltx2.worker")
# A prestarted worker may wait for GO through a whole diffusion run (15 min on a Thor at 1080p);
# it gives up after a day, or within GO_POLL_MS when its orchestrator is gone (wait_for_go).
GO_TIMEOUT_S = 86400.0
# How often a waiting worker checks that its orchestrator still exists (the bound on how long it
# outlives one that died).
GO_POLL_MS = 500
# Queued progress messages are dropped after this long if the orchestrator stopped reading, so a
# dead orchestrator can never keep a finished worker from exiting.
LINGER_MS = 2000


@dataclasses.dataclass
class WorkerContext:
    """What a stage function receives: its job's request, its plan and a way to report progress."""

    stage: Stage
    job_dir: Path
    #: the job's inputs (protocol.stage_request), read as the worker started; None only for a later job
    #: of a group whose job.json could not be read, which fails when its turn comes (see `request`)
    stage_request: StageRequest | None
    plan: dict[str, Any]
    attempt: int
    reporter: Reporter
    #: models loaded by an earlier job of the same group process, reused by the next (by name)
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: work that waits until this job's first denoising step is queued on the device (first_step_done)
    after_first_step: list[Callable[[], None]] = dataclasses.field(default_factory=list)

    @property
    def request(self) -> StageRequest:
        """The job's request; for a job whose job.json could not be read, the InvalidInput saying why."""
        return self.stage_request if self.stage_request is not None else read_request(self.job_dir)

    @property
    def job_id(self) -> str:
        """The job's id; a job whose record could not be read is named by its directory, as ids are."""
        return self.stage_request.job_id if self.stage_request is not None else self.job_dir.name

    @property
    def spec(self) -> JobSpec:
        return self.request.spec

    @property
    def model_root(self) -> Path:
        """The diffusers-layout model folder the orchestrator resolved for this job."""
        return self.request.model_path

    def first_step_done(self) -> None:
        """Start what waited for this job's first denoising step (once; later calls find nothing).

        Why wait: at a job's start the GPU is idle until the first step's kernels are launched, so anything
        else the process does then delays the clip. The read-ahead of the next job's embeddings started
        there made a group's second clip 0.2 s slower than its third on an H100 (its first stage-1 step took
        0.56 s against 0.37 s, docs/benchmarks.md version 20); after the first step the GPU has work queued."""
        waiting, self.after_first_step = self.after_first_step, []
        for work in waiting:
            work()

    def progress(self, phase: str, step: int = 0, total: int = 0) -> None:
        """Report that `phase` started (step 0) or finished `step` of `total`."""
        self.reporter.progress(phase, step, total)
        fault_point("worker.progress", stage=self.stage.value, phase=phase, step=step)


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


def device_memory() -> int:
    """Bytes of the memory this process's peaks count against: the GPU's (torch's device 0, the lane's
    device) once CUDA is in use, else the host's RAM. The orchestrator plans overlapped stages with it."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.get_device_properties(0).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def parse_args(stage: Stage, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m {stage.module}", description=f"Run the {stage.value} stage.", allow_abbrev=False
    )
    parser.add_argument(
        "--job-dir",
        type=Path,
        action="append",
        required=True,
        help="job directory holding job.json; repeat it to run the stage for a group of jobs in one process",
    )
    parser.add_argument("--endpoint", default="", help="orchestrator ZeroMQ endpoint (omit to run standalone)")
    parser.add_argument("--attempt", type=int, default=1, help="attempt number, for reports")
    parser.add_argument("--plan", default="{}", help="JSON object: the memory plan for this attempt")
    parser.add_argument("--heartbeat-s", type=float, default=2.0, help="seconds between heartbeats")
    parser.add_argument(
        "--orchestrator-pid",
        type=int,
        default=0,
        help="the orchestrator's pid on this host: a worker waiting for GO exits once it is gone (0: not watched)",
    )
    parser.add_argument(
        "--niceness",
        type=int,
        default=0,
        help="added to this process's CPU niceness at start (decoders beside a diffusion: lane_links)",
    )
    return parser.parse_args(argv)


#: A stage function returns its output file names, or a future of them when it hands the end of
#: its work to a background thread (the video stage's H.264 encode): the runtime then starts the
#: group's next job and reports this one done once the future is.
Work = Callable[[WorkerContext], "list[str] | Future[list[str]]"]
#: Runs once after GO with every job of the process, before the first job's `work` (e.g. to
#: encode all prompts of a group with one text-encoder load before the transformer loads).
Prepare = Callable[[list[WorkerContext]], None]


def run_worker(stage: Stage, work: Work, argv: list[str] | None = None, prepare: Prepare | None = None) -> NoReturn:
    """Run a stage function for one job (or a group of jobs) as a process and exit with its code."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(stage, argv)
    context = zmq.Context()
    socket = None
    reporter = Reporter(stage, "", None)
    code = ExitCode.OTHER
    try:
        request = read_request(args.job_dir[0])
        reporter.job_id = request.job_id
        if args.niceness:  # decoders beside the lane's diffusion yield the cores to it (placement.lane_links)
            log.info("CPU niceness %d", os.nice(args.niceness))
        if "CUDA_VISIBLE_DEVICES" in os.environ:  # its lane's device (orchestrator.placement.lanes), in its log
            log.info("CUDA_VISIBLE_DEVICES=%r", os.environ["CUDA_VISIBLE_DEVICES"])
        if (mps := cuda_mps.describe_client(os.environ)) is not None:  # `[worker] cuda_mps` (WorkerLink)
            log.info("%s", mps)
        log_cpu_kernels()
        log.info("gc: %d objects of the imports frozen out of its passes", gc_pauses.freeze_imports())
        gc_pauses.watch()
        if args.endpoint:
            socket = connect(context, args.endpoint)
            reporter.socket = socket
        if socket is not None:
            wait_for_go(reporter, socket, args.attempt, args.orchestrator_pid)
            if not speaks_for_group():  # a context-parallel rank past 0: rank 0 reports for the group
                reporter.socket = None
        # A stage's seconds count from GO: a worker started ahead of its turn may have waited through
        # a whole diffusion run, which is the orchestrator's to report (as the attempt's `waited_s`).
        started = time.monotonic()
        reporter.start_heartbeat(args.heartbeat_s)
        fault_point("worker.started", stage=stage.value, attempt=args.attempt, job_dir=args.job_dir[0])
        plan, shared = json.loads(args.plan), {}
        first = WorkerContext(stage, args.job_dir[0], request, plan, args.attempt, reporter, shared)
        contexts = [first] + [group_member(stage, path, plan, reporter, shared) for path in args.job_dir[1:]]
        if prepare is not None and len(contexts) > 1:
            prepare(contexts)
        run_jobs(contexts, work, started)
        code = ExitCode.OK
    except BaseException as exc:  # the process edge: every failure becomes an exit code
        code = exit_code_of(exc)
        traceback.print_exc()
        remove_own_temp_files(args.job_dir)
        reporter.send(stages.Failed(reporter.job_id, stage.value, int(code), summarize(exc, args.job_dir[0])))
    finally:
        if socket is not None:
            socket.close(linger=LINGER_MS)
        context.term()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))  # skip interpreter teardown: the OS frees the memory faster than Python


def speaks_for_group() -> bool:
    """Whether this worker reports to the orchestrator after GO: every worker but the ranks past 0 of a
    context-parallel attempt (orchestrator.placement.worker_gang), whose progress and Done would be rank
    0's again (and a Done without the outputs rank 0 writes). Their exit status still speaks for them."""
    return os.environ.get(stages.CP_RANK_ENV, "0") == "0"


def log_cpu_kernels() -> None:
    """Name, in the worker's log, the instruction set ATen's CPU kernels were dispatched to and the number of
    threads they use: two CPU processes with equal inputs have drifted apart by ~1e-6 on CI now and then
    (issue 23, cause open), and only a different kernel path or thread count reproduced those numbers. With
    this line in both workers' logs, the next drift says whether that is it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        log.info("CPU kernels: %s, %d threads", torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())


def group_member(stage: Stage, job_dir: Path, plan: dict[str, Any], reporter: Reporter, shared: dict) -> WorkerContext:
    """The context of a later job of a group; an unreadable job.json fails when its turn comes."""
    try:
        request = read_request(job_dir)
    except InvalidInput:
        request = None
    return WorkerContext(stage, job_dir, request, plan, 1, reporter, shared)


@dataclasses.dataclass
class StartedJob:
    """A job whose stage function returned; its outputs may still be in the making."""

    ctx: WorkerContext
    started: float
    outputs: Future[list[str]]
    peak_gpu: int  #: taken when the stage function returned, before the next job resets it
    grouped: bool
    reported: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def job_id(self) -> str:
        return self.ctx.job_id

    def report(self, outputs: Future[list[str]]) -> None:
        """Send Done the moment the outputs exist (or Failed for a group member's invalid input).

        A done-callback of `outputs`: it runs on the thread that finished them (the encode thread),
        or at once when they were finished already, so a synchronous stage reports before the next
        job starts. Other errors are left to `finish_job`, which ends the process.
        """
        try:
            error = outputs.exception()
            if error is None:
                seconds = time.monotonic() - self.started
                stage, rss = self.ctx.stage.value, peak_memory()[1]
                done = stages.Done(self.job_id, stage, outputs.result(), seconds, self.peak_gpu, rss, device_memory())
                self.ctx.reporter.send(done)
            elif isinstance(error, InvalidInput) and self.grouped:
                fail_alone(self.ctx, error)
        finally:
            self.reported.set()


def run_jobs(contexts: list[WorkerContext], work: Work, started: float) -> None:
    """Run the jobs in order; a job whose outputs are still being written (a future) overlaps the
    next one, and the process ends only after every job is reported."""
    pending: StartedJob | None = None
    for index, ctx in enumerate(contexts, start=1):
        try:
            current = start_job(ctx, work, started if index == 1 else time.monotonic(), index, len(contexts))
        except BaseException:
            # This job ends the process; the one still encoding may yet finish and be reported
            # done, so the orchestrator need not redo it. Its own error, if any, is left unsaid:
            # without a Done it is rerun anyway.
            if pending is not None:
                pending.outputs.exception()
                pending.reported.wait()
            ctx.reporter.job_id = ctx.job_id
            raise
        if pending is not None:
            finish_job(pending)
        pending = current
    if pending is not None:
        finish_job(pending)


def start_job(ctx: WorkerContext, work: Work, started: float, index: int, count: int) -> StartedJob | None:
    """Job `index` of `count` in this process; None when it failed on its own invalid input (the
    group goes on). Any other error propagates and ends the process."""
    reporter = ctx.reporter
    reporter.job_id = ctx.job_id
    grouped = count > 1
    if grouped:
        ctx.progress(stages.JOB_STARTED_PHASE, index, count)
        reset_peak_memory()
    try:
        ctx.request  # noqa: B018 - an unreadable job.json raises the InvalidInput that explains it
        outputs = work(ctx)
    except InvalidInput as exc:
        if not grouped:
            raise
        fail_alone(ctx, exc)
        return None
    if not isinstance(outputs, Future):
        finished: Future[list[str]] = Future()
        finished.set_result(outputs)
        outputs = finished
    job = StartedJob(ctx, started, outputs, peak_memory()[0], grouped)
    outputs.add_done_callback(job.report)
    return job


def finish_job(job: StartedJob) -> None:
    """Wait until the job is reported; re-raise an error that must end the process, naming the job."""
    error = job.outputs.exception()
    job.reported.wait()
    if error is not None and not (isinstance(error, InvalidInput) and job.grouped):
        job.ctx.reporter.job_id = job.job_id  # the process's Failed message names this job
        raise error


def fail_alone(ctx: WorkerContext, exc: InvalidInput) -> None:
    """Report one group member's invalid input; the process goes on with the others."""
    traceback.print_exception(exc)
    ctx.reporter.send(stages.Failed(ctx.job_id, ctx.stage.value, int(exc.exit_code), summarize(exc)))


def reset_peak_memory() -> None:
    """Start a new accelerator peak for the next job of a group (host RSS peaks are per process)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def read_request(job_dir: Path) -> StageRequest:
    """The job's request, read from its job.json (protocol.stage_request); InvalidInput when it cannot be."""
    try:
        return read_stage_request(job_dir)
    except JobRecordError as exc:  # its message names the file already
        raise InvalidInput(f"cannot read {exc.where}: {exc.problem}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"cannot read {job_dir / JOB_FILE}: {exc}") from exc


def connect(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """A DEALER to the orchestrator; over tcp (a farm's worker) with the CURVE keys of
    `WORKER_CURVE_ENV`, never in the command line, where any user of the node could read them."""
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, LINGER_MS)
    if endpoint.startswith("tcp://"):
        keys = os.environ.get(WORKER_CURVE_ENV, "").split()
        if len(keys) != 3:
            raise EnvironmentFailure(f"{endpoint}: a tcp endpoint needs CURVE keys in {WORKER_CURVE_ENV}")
        socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = (key.encode() for key in keys)
    socket.connect(endpoint)
    return socket


def wait_for_go(reporter: Reporter, socket: zmq.Socket, attempt: int, orchestrator_pid: int = 0) -> None:
    """Say READY, then block until GO arrives; give up when the orchestrator is gone or never answers.

    A prestarted worker holds its imports (~300 MB) while it waits, so it must not outlive the
    orchestrator it waits for. Its parent is that orchestrator (exec'd) or the orchestrator's fork
    server, which exits with it; either way a new parent means the orchestrator is gone. The
    orchestrator's own pid (`orchestrator_pid`, checked with its start time so a reused pid does not
    count) covers a fork server that outlives it (stopped, hung): the worker then exits as well.
    """
    parent = os.getppid()
    orchestrator = parent_bound.Watched.of(orchestrator_pid) if orchestrator_pid else None
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else 0
    reporter.send(stages.Ready(reporter.job_id, reporter.stage.value, attempt, os.getpid(), threads))
    deadline = time.monotonic() + GO_TIMEOUT_S
    while time.monotonic() < deadline:
        if os.getppid() != parent or (orchestrator is not None and not orchestrator.is_running()):
            raise OrchestratorGone("the orchestrator that started this worker is gone; nobody will send GO")
        if socket.poll(timeout=GO_POLL_MS):
            message = codec.decode(socket.recv())
            if isinstance(message, stages.Go):
                return
    raise TimeoutError("no GO from the orchestrator (it stopped or never answered)")


class OrchestratorGone(RuntimeError):
    """A worker waiting for GO found its orchestrator gone (it then exits at once)."""


def remove_own_temp_files(job_dirs: list[Path]) -> None:
    """Delete the temp files this process left half-written (protocol.files.temp_path_for names
    them after its pid), so a full disk is not made fuller by the attempt that found it full."""
    for job_dir in job_dirs:
        try:
            for leftover in job_dir.rglob(f".*.tmp-{os.getpid()}*"):
                leftover.unlink(missing_ok=True)
        except OSError:  # the exit code and the Failed report matter more than the cleanup
            log.warning("could not remove temp files in %s", job_dir, exc_info=True)


def summarize(exc: BaseException, job_dir: Path | None = None) -> str:
    """One line for reports; the full traceback goes to the worker log. A full disk is named by
    the path its error gave, or, when the writer gave none (safetensors), by the job's directory."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}"
    if job_dir is not None and is_no_space(exc) and not getattr(exc, "filename", None):
        line += f" (writing for the job in {job_dir}; free space on its disk, then resume it)"
    return line[:500]
