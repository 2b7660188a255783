"""One attempt of a stage for one or more jobs: start its worker, follow it, record each job's end.

The one follower of worker processes (DESIGN.md rule 7): a single job is a group of one. The
worker is given every member's directory (`--job-dir` repeated); it opens them in order, saying
"job started" for each after the first, and sends each member's Done or Failed on its own. A
member's attempt is recorded in its job.json from the moment the worker opens it, with the
worker's pid (so a restarted daemon can stop an orphan), its lane (`"lane": 1, "device": "cuda:1"`,
when the lane pins a device) and, in a group, the group's job ids; the group's log is
hard-linked into each member's logs. When the process exits, members it was still working on are
settled by its exit status; members it never reached get no attempt.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.placement.worker_gang import WorkerGang
from orchestrator.placement.worker_link import RemoteProcess, SpawnedWorker, WorkerLink, discard_worker
from orchestrator.run.job_hooks import HooksFor, StageEvent
from orchestrator.run.jobdir import JobDir, tail
from orchestrator.run.policy import describe_plan
from orchestrator.run.runner import StageOutcome, follow_until_exit, hung_reason, spawn_worker
from orchestrator.run.states import AttemptResult, EventKind, StageEventKind, attempt_result
from protocol import stages
from protocol.errors import Failure, classify_exit, describe_exit
from protocol.files import Stage


def run_attempt(
    members: list[JobDir],
    stage: Stage,
    plan: dict[str, Any],
    settings: Settings,
    link: WorkerLink,
    hooks_for: HooksFor,
    prestarted: SpawnedWorker | None = None,
    on_spawn: Callable[[], None] = lambda: None,
) -> dict[str, StageOutcome]:
    """Run one worker process for `stage` over `members`, in order; returns the outcome of each
    member it started. `prestarted`, a worker started earlier for exactly this attempt (imports
    done, waiting for GO), is adopted; any other is stopped. `on_spawn` runs once the worker is
    up (the caller may prestart the next stage's worker then)."""
    follower = AttemptFollower(members, stage, plan, settings, link, hooks_for, prestarted)
    on_spawn()
    returncode, forced = follow_until_exit(
        follower.worker.process,
        follower.pump,
        lambda: follower.last_heard,
        follower.should_stop,
        settings.hung_after_s,
        follower.has_settled_all,
    )
    # A farm stage can send its last word before its placement is read; its exit comes after it.
    follower.note_placement()
    follower.settle_unfinished(returncode, forced)
    return follower.outcomes


class AttemptFollower:
    """Follows one worker: starts members' attempts as the worker opens them, settles them."""

    def __init__(
        self,
        members: list[JobDir],
        stage: Stage,
        plan: dict[str, Any],
        settings: Settings,
        link: WorkerLink,
        hooks_for: HooksFor,
        prestarted: SpawnedWorker | None = None,
    ) -> None:
        self.by_id = {job.id: job for job in members}
        self.stage, self.plan, self.settings, self.link, self.hooks_for = stage, plan, settings, link, hooks_for
        self.running: dict[str, tuple[int, float]] = {}  #: job id -> (attempt, start time)
        self.attempt_of: dict[str, int] = {}  #: job id -> its attempt, settled or not
        self.outcomes: dict[str, StageOutcome] = {}
        self.done: dict[str, stages.Done] = {}
        self.worker: SpawnedWorker | None = None
        self.ready = False  #: the worker said READY: its imports worked
        self.go_at: float | None = None  #: when it was sent GO: its stage's seconds count from here
        for job in members:  # before the worker starts: later members' attempts start mid-run
            job.clean_partial_files()
        leader = members[0]
        attempt = self.start(leader.id)
        self.log = leader.log_path(stage, attempt)
        job_ids = tuple(self.by_id)
        if prestarted is not None and prestarted.matches(job_ids, stage, attempt, plan):
            self.worker = prestarted
        else:
            discard_worker(prestarted, link)
            self.worker = spawn_worker(members, stage, attempt, plan, link, settings.heartbeat_s)
        leader.note_worker(stage, self.worker.process.pid, **rank_pids(self.worker.process))
        self.where: dict[str, Any] = {}  #: a remote process's node and pids, once it is placed
        self.threads: dict[str, int] = {}  #: the worker's CPU threads, once it said READY
        self.last_heard = time.monotonic()

    def start(self, job_id: str) -> int:
        """Record a member's attempt as running; its log is the group's log."""
        job = self.by_id[job_id]
        group = {"group": list(self.by_id)} if len(self.by_id) > 1 else {}
        lane = self.link.lane
        lane = {"lane": lane.index, "device": lane.device} if lane.device else {}  # where it runs
        attempt = job.start_attempt(self.stage, self.plan, clean=False, **group, **lane)
        if self.worker is not None:  # a later member of a group: the worker writes the leader's log
            link_log(self.log, job.log_path(self.stage, attempt))
            job.note_worker(self.stage, self.worker.process.pid, **self.where, **self.threads)
        self.running[job_id] = (attempt, time.monotonic())
        self.attempt_of[job_id] = attempt
        detail = describe_plan(self.stage, self.plan)
        if group:
            detail += f"; one process for {len(self.by_id)} jobs"
        self.hooks_for(job).listener(StageEvent(self.stage.value, StageEventKind.STARTED, attempt, detail))
        return attempt

    def should_stop(self) -> Failure | None:
        """Why the worker must stop now (any member's cancel, or the orchestrator stopping)."""
        return next((why for job in self.by_id.values() if (why := self.hooks_for(job).should_stop())), None)

    def has_settled_all(self) -> bool:
        """Every member has its outcome (the worker sent each one's Done or Failed): nothing the
        worker still sends can change one, so only its exit is left to wait for."""
        return len(self.outcomes) == len(self.by_id)

    def note_placement(self) -> None:
        """Record where a remote worker runs in its members' attempts, once, as soon as it is known:
        in every attempt it opened, also those it already settled (a short stage can finish before
        its placement is read; run_attempt calls this again once the worker has exited)."""
        process = self.worker.process if self.worker else None
        if self.where or not isinstance(process, RemoteProcess) or not process.placement:
            return
        self.where = dict(process.placement)
        for job_id, attempt in self.attempt_of.items():
            self.by_id[job_id].note_where(self.stage, attempt, **self.where)

    def pump(self, timeout_ms: int) -> bool:
        """Handle at most one message of the worker; False when none came in time."""
        self.note_placement()
        received = self.link.receive_for(list(self.by_id), self.stage.value, timeout_ms)
        if received is None:
            return False
        identity, message = received
        self.last_heard = time.monotonic()
        job_id = message.id
        if isinstance(message, stages.Ready):
            self.ready = True
            self.link.send(identity, stages.Go(job_id, self.stage.value))
            self.go_at = time.monotonic()
            if message.cpu_threads:  # what its lane's share of the CPUs came to (orchestrator.placement.lanes)
                self.threads = {"cpu_threads": message.cpu_threads}
                for member in self.running:
                    self.by_id[member].note_worker(self.stage, self.worker.process.pid, **self.where, **self.threads)
        elif isinstance(message, stages.Progress) and message.phase == stages.JOB_STARTED_PHASE:
            if job_id not in self.running and job_id not in self.outcomes:
                self.start(job_id)
            return True
        elif isinstance(message, stages.Progress) and job_id in self.running:
            # Timestamped by the orchestrator as it arrives: benchmarks read load times and s/step here.
            self.by_id[job_id].log_event(
                EventKind.STAGE_PROGRESS, stage=self.stage.value, phase=message.phase, step=message.step,
                total=message.total,
            )  # fmt: skip
        elif isinstance(message, stages.Done) and job_id in self.running:
            self.done[job_id] = message
            job = self.by_id[job_id]
            missing = [name for name in job.outputs_of(self.stage) if not (job.path / name).is_file()]
            if missing:
                self.settle(job_id, Failure.CRASH, f"reported done without writing {', '.join(missing)}", 1)
            else:
                self.settle(job_id, None, "")
        elif isinstance(message, stages.Failed) and job_id in self.running:
            failure = classify_exit(message.exit_code) or Failure.CRASH
            self.settle(job_id, failure, message.error, message.exit_code)
        self.hooks_for(self.by_id[job_id]).listener(message)
        return True

    def settle_unfinished(self, returncode: int, forced: Failure | None) -> None:
        """Settle the members the worker was still working on when it exited.

        A member stopped only because another member of its group was cancelled gets no outcome:
        its attempt is closed as interrupted and the scheduler runs it again. A worker that exited
        0 with a member's outputs written had finished it, whatever stop came after (its Done
        may be lost in the race): that member succeeded, never "cancelled ... exit 0".
        """
        for job_id in list(self.running):
            if returncode == 0 and self.wrote_outputs(job_id):
                self.settle(job_id, None, "")
                continue
            own = self.hooks_for(self.by_id[job_id]).should_stop() if forced in STOPS else None
            if forced in STOPS and own is None:
                self.running.pop(job_id)
                self.by_id[job_id].finish_attempt(
                    self.stage, AttemptResult.INTERRUPTED, reason="stopped with its group for another job"
                )
                continue
            failure = own or forced or classify_exit(returncode, self.ready) or Failure.CRASH
            self.settle(job_id, failure, self.exit_reason(failure, returncode), returncode)

    def wrote_outputs(self, job_id: str) -> bool:
        """Every output of the stage is in the member's directory; workers write them atomically
        (temp name, fsync, rename), so a file present is a file complete."""
        job = self.by_id[job_id]
        return all((job.path / name).is_file() for name in job.outputs_of(self.stage))

    def exit_reason(self, failure: Failure, returncode: int) -> str:
        if failure is Failure.HUNG:
            return hung_reason(self.settings.hung_after_s)
        if failure in STOPS:
            return "cancelled on request" if failure is Failure.CANCELLED else "the orchestrator is stopping"
        if failure is Failure.ENVIRONMENT and not self.ready:
            return f"the worker {describe_exit(returncode)} before it was ready (an import or environment error)"
        if returncode:
            return describe_exit(returncode)
        return "the worker exited 0 before writing this job's outputs"

    @property
    def waited_s(self) -> float:
        """How long the worker waited between its start and GO: its imports, and for a worker
        started ahead of its turn the stage before it (0 until GO was sent)."""
        if self.go_at is None or self.worker is None:
            return 0.0
        return max(0.0, self.go_at - self.worker.spawned)

    def settle(self, job_id: str, failure: Failure | None, reason: str, returncode: int = 0) -> None:
        """Close a member's attempt in its job.json and tell its hooks.

        Its `seconds` count from GO (the worker's own count when it reported done), never from the
        start of a worker that was started ahead and waited; that wait is recorded as `waited_s`.
        """
        attempt, started = self.running.pop(job_id)
        job, done = self.by_id[job_id], self.done.get(job_id)
        outcome = StageOutcome(
            returncode=returncode,
            failure=failure,
            reason=reason,
            log_tail=tail(self.log, self.settings.stderr_tail_lines) if failure else "",
            seconds=done.seconds if done else time.monotonic() - max(started, self.go_at or started),
            peak_gpu_bytes=done.peak_gpu_bytes if done else 0,
            peak_rss_bytes=done.peak_rss_bytes if done else 0,
            device_memory_bytes=done.device_memory_bytes if done else 0,
            waited_s=self.waited_s,
        )
        job.finish_attempt(
            self.stage,
            attempt_result(failure),
            returncode=outcome.returncode,
            reason=outcome.reason,
            seconds=round(outcome.seconds, 3),
            waited_s=round(outcome.waited_s, 3),
            peak_gpu_bytes=outcome.peak_gpu_bytes,
            peak_rss_bytes=outcome.peak_rss_bytes,
            device_memory_bytes=outcome.device_memory_bytes or None,
        )
        hooks = self.hooks_for(job)
        hooks.on_attempt(self.stage, attempt, self.plan, outcome)
        if failure is None:
            event = StageEvent(self.stage.value, StageEventKind.SUCCEEDED, attempt, f"{outcome.seconds:.1f} s")
        else:
            event = StageEvent(self.stage.value, StageEventKind.FAILED, attempt, f"{failure.value}: {reason}")
        hooks.listener(event)
        self.outcomes[job_id] = outcome


def rank_pids(process: object) -> dict[str, list[int]]:
    """`rank_pids` for an attempt's record when its process is a context-parallel gang: a restarted daemon
    stops every rank of an orphaned one, not only rank 0 (whose pid is the attempt's `pid`)."""
    return {"rank_pids": [member.pid for member in process.members]} if isinstance(process, WorkerGang) else {}


#: Failures the orchestrator causes by stopping a worker on purpose.
STOPS = frozenset({Failure.CANCELLED, Failure.INTERRUPTED})


def link_log(source: Path, target: Path) -> None:
    """Make a member's attempt log the group's log (a hard link, so it grows with it)."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:  # another file system, or links not allowed: a copy of what exists now
        if source.is_file():
            shutil.copyfile(source, target)
