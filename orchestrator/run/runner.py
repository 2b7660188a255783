"""Start one stage worker, follow it over ZeroMQ, and classify how it ended.

Each worker connects to its lane's socket (WorkerLink: orchestrator.placement.worker_link),
says READY, gets GO, streams progress and heartbeats, and exits. Whatever the worker says, the
verdict comes from its exit status (protocol.errors.classify_exit): a worker killed by the
kernel says nothing at all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from orchestrator.placement.fork_client import ForkServerUnusable, worker_environment
from orchestrator.placement.worker_gang import start_gang
from orchestrator.placement.worker_link import RemoteProcess, SpawnedWorker, WorkerLink, WorkerProcess, stop_process
from orchestrator.run.jobdir import JobDir
from protocol.errors import Failure
from protocol.files import Stage

log = logging.getLogger("ltx2.orchestrator")
# Poll interval of the follow loop: short enough that progress feels live and an exit is noticed
# at once, long enough to cost nothing.
POLL_MS = 200
# After a worker exits, messages it sent just before may still be in flight.
DRAIN_MS = 300
# Once a worker has settled every job it was given (Done or Failed of each), nothing it still sends
# can change an outcome: its exit is looked for this often instead of every POLL_MS, and no drain
# follows it, so the next stage starts as soon as the process is gone (POLL_MS + DRAIN_MS, half a
# second per stage, was most of a tiny job's time between its stages).
SETTLED_POLL_MS = 10


@dataclasses.dataclass
class StageOutcome:
    """How one attempt ended."""

    returncode: int
    failure: Failure | None
    reason: str  #: one line: the worker's own error, or how the process ended
    log_tail: str
    seconds: float  #: from GO to the end: the stage's own time
    peak_gpu_bytes: int = 0
    peak_rss_bytes: int = 0
    device_memory_bytes: int = 0  #: the memory the peaks count against (the worker's GPU, or the host's RAM)
    waited_s: float = 0.0  #: from the worker's start to GO (imports; for a prestarted one, its wait)

    @property
    def ok(self) -> bool:
        return self.failure is None


def worker_args(
    jobs: list[JobDir],
    stage: Stage,
    attempt: int,
    plan: dict[str, Any],
    endpoint: str,
    heartbeat_s: float,
    orchestrator_pid: int = 0,
    niceness: int = 0,
) -> list[str]:
    """The arguments of one worker (after `python -m services.<stage>`); several jobs make a group.
    `orchestrator_pid`, this process on this host, lets a waiting worker notice when it is gone;
    `niceness` is added to its CPU niceness as it starts (the link's: decoders beside a diffusion)."""
    watch = ["--orchestrator-pid", str(orchestrator_pid)] if orchestrator_pid else []
    watch += ["--niceness", str(niceness)] if niceness else []
    return [
        *(arg for job in jobs for arg in ("--job-dir", str(job.path))),
        "--endpoint", endpoint,
        "--attempt", str(attempt),
        "--plan", json.dumps(plan),
        "--heartbeat-s", str(heartbeat_s),
        *watch,
    ]  # fmt: skip


def spawn_worker(
    job: JobDir | list[JobDir],
    stage: Stage,
    attempt: int,
    plan: dict[str, Any],
    link: WorkerLink,
    heartbeat_s: float,
) -> SpawnedWorker:
    """Start a worker; it says READY and waits for GO before it touches the GPU (DESIGN.md rule 5).

    Given a list of jobs it is a group worker (stage-major); its log is the first job's. It sees
    only the link's lane's device (`CUDA_VISIBLE_DEVICES`), if the lane pins one.
    """
    jobs = job if isinstance(job, list) else [job]
    job_ids = tuple(job.id for job in jobs)
    worker = SpawnedWorker(start_process(jobs, stage, attempt, plan, link, heartbeat_s), stage, attempt, plan, job_ids)
    link.started.append(worker)
    return worker


def start_process(
    jobs: list[JobDir], stage: Stage, attempt: int, plan: dict[str, Any], link: WorkerLink, heartbeat_s: float
) -> WorkerProcess:
    """The worker's process: on the link's farm, forked by its fork server, or exec'd."""
    log_path = jobs[0].log_path(stage, attempt)
    ranks = int(plan.get("context_parallel", 1))
    if link.spawner is not None:  # another host: its scheduler, not a pid here, bounds its life
        args = worker_args(jobs, stage, attempt, plan, link.endpoint, heartbeat_s, niceness=link.niceness)
        return link.spawner.spawn(stage.module, args, log_path, ranks)
    args = worker_args(jobs, stage, attempt, plan, link.endpoint, heartbeat_s, os.getpid(), link.niceness)
    visible, threads = link.lane.visible_devices, link.lane.threads
    mps = link.mps_environment()
    if ranks > 1:  # one clip over N processes (orchestrator.placement.worker_gang): one attempt, stopped together
        environment = functools.partial(worker_environment, visible, extra=mps)
        return start_gang(stage.module, args, log_path, ranks, environment, threads, stop_process)
    if link.fork_server is not None:
        try:
            return link.fork_server.spawn(stage.value, args, log_path, visible, threads, mps)
        except ForkServerUnusable as exc:  # said once: the link execs workers from now on
            log.warning("%s", exc)
            if link.owns_fork_server:
                link.fork_server.close()
            link.fork_server = None
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", stage.module, *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: a kill reaches any helpers it spawned
            env=worker_environment(visible, threads, mps),
        )


def follow_until_exit(
    process: WorkerProcess,
    pump: Callable[[int], bool],
    last_heard: Callable[[], float],
    should_stop: Callable[[], Failure | None],
    hung_after_s: float,
    has_settled_all: Callable[[], bool] = lambda: False,
) -> tuple[int, Failure | None]:
    """Handle a worker's messages (`pump`) until it exits, stopping it when `should_stop` says
    why (cancelled, interrupted) or when it is silent for `hung_after_s`; returns (exit status,
    the reason it was stopped or None). A remote process still queued for a node is not silent:
    the hang clock starts when it is placed. Once `has_settled_all` (the worker said its last
    word), its exit is awaited in SETTLED_POLL_MS steps and only messages already here are read."""
    forced: Failure | None = None
    queued_until = 0.0
    while (returncode := process.poll()) is None:
        if isinstance(process, RemoteProcess) and process.queued:
            queued_until = time.monotonic()
        if pump(SETTLED_POLL_MS if has_settled_all() else POLL_MS):
            continue
        forced = should_stop()
        if forced is None and time.monotonic() - max(last_heard(), queued_until) > hung_after_s:
            forced = Failure.HUNG
        if forced is not None:
            returncode = stop_process(process)
            break
    while pump(0 if has_settled_all() else DRAIN_MS):  # messages sent just before the exit
        pass
    return returncode, forced


def hung_reason(hung_after_s: float) -> str:
    return f"no message for {hung_after_s:.0f} s; killed"
