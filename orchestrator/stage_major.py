"""Stage-major scheduling: each stage runs once for a group of jobs, so each model loads once.

A batch (or several queued daemon jobs) goes stage by stage. Jobs whose next stage can share one
set of loaded weights (same model, revision, dtype, memory plan and, for diffusion, the same
fused LoRAs) run that stage in one worker process started with `--job-dir` repeated; it loads
the models once and writes each job's outputs into that job's directory, reporting each job's
start, progress and end on its own. Still one process per stage: the group processes run one
after another, and each exits before the next stage's process starts.

A job the group process did not finish (it crashed, ran out of memory or was killed) then runs
the stage on its own through the ordinary path, with the retry ladder (orchestrator.pipeline);
jobs it never reached form a new group. Finished outputs are never redone, and a group never
does worse than one process per clip.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.jobdir import JobDir, tail
from orchestrator.pipeline import (
    JobFailed,
    JobHooks,
    StageEvent,
    finish_job,
    job_failed,
    next_attempt,
    pending_stages,
    record_outcome,
    run_stage_until_done,
)
from orchestrator.policy import describe_plan
from orchestrator.runner import StageOutcome, WorkerLink, follow_until_exit, hung_reason, spawn_worker
from protocol import stages
from protocol.errors import Failure, classify_exit, describe_exit
from protocol.files import STAGE_ORDER, Stage

#: A job's hooks (progress listener, cancellation, bookkeeping), as run_job takes them.
HooksFor = Callable[[JobDir], JobHooks]


def group_key(job: JobDir, stage: Stage, plan: dict[str, Any]) -> str:
    """Jobs with equal keys can share one worker process for `stage`: same weights, same placement.

    LoRAs count only for diffusion, where they are fused into the transformer; the decoders
    never see them.
    """
    loras = job.record.get("loras", []) if stage is Stage.ENCODE_DIFFUSE else []
    fields = [job.record["model_path"], job.record.get("revision", ""), job.spec.dtype, plan, loras]
    return json.dumps(fields, sort_keys=True)


def form_groups(jobs: list[JobDir], stage: Stage, settings: Settings) -> list[tuple[dict[str, Any], list[JobDir]]]:
    """(plan, members) of each group of two or more jobs, in the jobs' order, at most
    `settings.group_size` members each; a job that shares nothing runs the ordinary way."""
    by_key: dict[str, tuple[dict[str, Any], list[JobDir]]] = {}
    for job in jobs:
        _, plan = next_attempt(job, stage, settings)
        by_key.setdefault(group_key(job, stage, plan), (plan, []))[1].append(job)
    groups = []
    for plan, members in by_key.values():
        for start in range(0, len(members), settings.group_size):
            chunk = members[start : start + settings.group_size]
            if len(chunk) > 1:
                groups.append((plan, chunk))
    return groups


def diffusion_processes(jobs: list[JobDir], settings: Settings) -> int:
    """How many encode_diffuse processes a stage-major run of `jobs` starts (one per group or lone
    job, if nothing fails); each loads the text encoder for its prompts not yet cached."""
    stage = Stage.ENCODE_DIFFUSE
    keys = Counter(group_key(job, stage, next_attempt(job, stage, settings)[1]) for job in jobs)
    return sum(math.ceil(count / settings.group_size) for count in keys.values())


def run_stage_major(
    jobs: list[JobDir], settings: Settings, link: WorkerLink, hooks_for: HooksFor
) -> dict[str, Path | JobFailed]:
    """Run every job to its published MP4, stage by stage; returns each job's MP4 path or failure.

    Each job resumes at its first stage whose outputs do not verify (as run_job does).
    """
    results: dict[str, Path | JobFailed] = {}
    for job in jobs:
        pending_stages(job, hooks_for(job))
    active = list(jobs)
    for stage in STAGE_ORDER:
        needing = [job for job in active if not job.has_outputs(stage)]
        results.update(run_groups(needing, stage, settings, link, hooks_for))
        for job in needing:
            if job.id in results or job.has_outputs(stage):
                continue
            try:
                run_stage_until_done(job, stage, settings, link, hooks_for(job))
            except JobFailed as exc:
                results[job.id] = exc
        active = [job for job in active if job.id not in results]
    for job in active:
        results[job.id] = finish_job(job, settings, hooks_for(job))
    return results


def run_groups(
    jobs: list[JobDir], stage: Stage, settings: Settings, link: WorkerLink, hooks_for: HooksFor
) -> dict[str, JobFailed]:
    """Run `stage` for `jobs` in group processes until no two unfinished, untried jobs can share
    one; returns the jobs that failed for good (bad input, missing model). The rest either have
    their outputs now or are left for the ordinary per-job path."""
    failures: dict[str, JobFailed] = {}
    tried: set[str] = set()
    while groups := form_groups([j for j in jobs if j.id not in tried and not j.has_outputs(stage)], stage, settings):
        cancelled = False
        for plan, members in groups:
            outcomes = run_group_attempt(members, stage, plan, settings, link, hooks_for)
            tried.update(outcomes)
            for job_id, outcome in outcomes.items():
                if outcome.failure is Failure.CANCELLED:
                    cancelled = True
                elif outcome.failure is not None and not outcome.failure.is_retryable:
                    # Bad input or a missing model fails alone the same way: no solo retry.
                    failures[job_id] = job_failed(next(j for j in members if j.id == job_id), stage, outcome, 1)
        if cancelled:  # the rest run (and see the cancellation) the ordinary way
            break
    return failures


def run_group_attempt(
    members: list[JobDir],
    stage: Stage,
    plan: dict[str, Any],
    settings: Settings,
    link: WorkerLink,
    hooks_for: HooksFor,
) -> dict[str, StageOutcome]:
    """One worker process runs `stage` for every member, in order; returns the outcome of each
    member it started. A member it never reached gets no outcome and no attempt record.

    Each member's attempt is recorded in its own job.json (with the group's job ids) from the
    moment the worker opens it, and the group's log is hard-linked into each member's logs.
    """
    group = _Group(members, stage, plan, settings, link, hooks_for)
    returncode, forced = follow_until_exit(
        group.worker.process,
        group.pump,
        lambda: group.last_heard,
        lambda: any(hooks_for(job).should_cancel() for job in members),
        settings.hung_after_s,
    )
    for job_id in list(group.running):
        failure = forced or classify_exit(returncode) or Failure.CRASH
        if forced is Failure.HUNG:
            reason = hung_reason(settings.hung_after_s)
        elif forced is Failure.CANCELLED:
            reason = "cancelled"
        else:
            reason = describe_exit(returncode) if returncode else "the group worker exited before finishing this job"
        group.settle(job_id, failure, reason, returncode)
    return group.outcomes


class _Group:
    """Follows one group worker: starts members' attempts as the worker opens them, settles them."""

    def __init__(
        self,
        members: list[JobDir],
        stage: Stage,
        plan: dict[str, Any],
        settings: Settings,
        link: WorkerLink,
        hooks_for: HooksFor,
    ) -> None:
        self.by_id = {job.id: job for job in members}
        self.stage, self.plan, self.settings, self.link, self.hooks_for = stage, plan, settings, link, hooks_for
        self.running: dict[str, tuple[int, float]] = {}  #: job id -> (attempt, start time)
        self.outcomes: dict[str, StageOutcome] = {}
        self.done: dict[str, stages.Done] = {}
        for job in members:  # before the worker starts: later members' attempts start mid-run
            job.clean_partial_files()
        leader = members[0]
        self.leader_id = leader.id
        attempt = self.start(leader.id)
        self.log = leader.log_path(stage, attempt)
        self.worker = spawn_worker(members, stage, attempt, plan, link, settings.heartbeat_s)
        for job in members:
            hooks_for(job).on_spawn(self.worker.process.pid)
        self.last_heard = time.monotonic()

    def start(self, job_id: str) -> int:
        """Record a member's attempt as running; its log is the group's log."""
        job = self.by_id[job_id]
        attempt = job.start_attempt(self.stage, self.plan, clean=False, group=list(self.by_id))
        if job_id != self.leader_id:  # the worker writes the leader's log
            link_log(self.log, job.log_path(self.stage, attempt))
        self.running[job_id] = (attempt, time.monotonic())
        detail = f"{describe_plan(self.stage, self.plan)}; one process for {len(self.by_id)} jobs"
        self.hooks_for(job).listener(StageEvent(self.stage.value, "started", attempt, detail))
        return attempt

    def pump(self, timeout_ms: int) -> bool:
        """Handle at most one message of the group's worker; False when none came in time."""
        received = self.link.receive_for(list(self.by_id), self.stage.value, timeout_ms)
        if received is None:
            return False
        identity, message = received
        self.last_heard = time.monotonic()
        job_id = message.id
        if isinstance(message, stages.Ready):
            self.link.send(identity, stages.Go(job_id, self.stage.value))
        elif isinstance(message, stages.Progress) and message.phase == stages.JOB_STARTED_PHASE:
            if job_id not in self.running and job_id not in self.outcomes:
                self.start(job_id)
            return True
        elif isinstance(message, stages.Done) and job_id in self.running:
            self.done[job_id] = message
            missing = [name for name in self.stage.outputs if not (self.by_id[job_id].path / name).is_file()]
            if missing:
                self.settle(job_id, Failure.CRASH, f"reported done without writing {', '.join(missing)}", 1)
            else:
                self.settle(job_id, None, "")
        elif isinstance(message, stages.Failed) and job_id in self.running:
            failure = classify_exit(message.exit_code) or Failure.CRASH
            self.settle(job_id, failure, message.error, message.exit_code)
        self.hooks_for(self.by_id[job_id]).listener(message)
        return True

    def settle(self, job_id: str, failure: Failure | None, reason: str, returncode: int = 0) -> None:
        """Close a member's attempt in its job.json and tell its hooks."""
        attempt, started = self.running.pop(job_id)
        job, done = self.by_id[job_id], self.done.get(job_id)
        outcome = StageOutcome(
            returncode=returncode,
            failure=failure,
            reason=reason,
            log_tail=tail(self.log, self.settings.stderr_tail_lines) if failure else "",
            seconds=done.seconds if done else time.monotonic() - started,
            peak_gpu_bytes=done.peak_gpu_bytes if done else 0,
            peak_rss_bytes=done.peak_rss_bytes if done else 0,
        )
        record_outcome(job, self.stage, outcome)
        hooks = self.hooks_for(job)
        hooks.on_attempt(self.stage, attempt, self.plan, outcome)
        if failure is None:
            hooks.listener(StageEvent(self.stage.value, "succeeded", attempt, f"{outcome.seconds:.1f} s"))
        else:
            hooks.listener(StageEvent(self.stage.value, "failed", attempt, f"{failure.value}: {reason}"))
        self.outcomes[job_id] = outcome


def link_log(source: Path, target: Path) -> None:
    """Make a member's attempt log the group's log (a hard link, so it grows with it)."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:  # another file system, or links not allowed: a copy of what exists now
        if source.is_file():
            shutil.copyfile(source, target)
