"""One job's steps: take it, find its unfinished stages, attempt a stage until the policy is done
with it, publish the MP4. orchestrator.run.stage_major runs them for one job or many.

A stage whose outputs verify against job.json is skipped, so running a job again after a crash
resumes at the first unfinished stage. The finished video is published to the output folder as
`<name>_<YYYYmmdd_HHMMSS>.mp4` once (orchestrator.run.publishing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from config.settings import Settings
from orchestrator.placement.processes import kill_orphan
from orchestrator.placement.worker_link import SpawnedWorker, WorkerLink, discard_worker
from orchestrator.run import reuse
from orchestrator.run.job_hooks import JobHooks, StageEvent
from orchestrator.run.jobdir import CANCEL_REASON, JobDir, describe_owner
from orchestrator.run.policy import Attempt, Decision, decide, initial_plan
from orchestrator.run.publishing import publish_job
from orchestrator.run.runner import StageOutcome, spawn_worker
from orchestrator.run.stage_attempt import run_attempt
from orchestrator.run.states import AttemptResult, EventKind, JobState, StageEventKind, TransitionError
from protocol.errors import Failure, is_no_space
from protocol.fault_points import fault_point
from protocol.files import STAGE_ORDER, Stage


class JobStopped(Exception):
    """The job stopped without a video, by the policy's decision after `stage` failed with
    `outcome`: `job_state` says how it stopped (FAILED; CANCELLED on request; QUEUED again when the
    orchestrator was interrupted, to be resumed). Not every stop is a failure, hence the name."""

    def __init__(self, stage: Stage, outcome: StageOutcome, decision: Decision) -> None:
        self.stage = stage
        self.failure = outcome.failure or Failure.CRASH
        self.outcome = outcome
        self.reason = decision.reason
        self.job_state = decision.job_state or JobState.FAILED
        super().__init__(f"stage {stage.value} failed ({self.failure.value}): {self.reason}")


class JobBusy(Exception):
    """The job is running in another live process (the daemon, or another `ltx2` command): two
    orchestrators must never run one job."""

    def __init__(self, job: JobDir) -> None:
        runner = job.live_runner()
        who = describe_owner(runner) if runner else "another process"
        super().__init__(f"job {job.id} is running in {who}; wait for it to end, or stop it there first")


def take_job(job: JobDir, owner: str | None = None) -> None:
    """Move a job to RUNNING for this process, about to run it, whatever it was; `owner` (the `ltx2`
    command doing so) becomes its owner (None: the recorded one stays).

    A job running in another live process is refused (JobBusy). A job found RUNNING otherwise was left
    so by an orchestrator that died: its attempts are closed as interrupted and the workers it left
    are stopped first (`release_orphaned`). A finished, failed or cancelled one is queued again (a
    re-run, a decode, a resume).
    """
    if job.live_runner() is not None:
        raise JobBusy(job)
    if job.state is JobState.RUNNING:
        release_orphaned(job)
    elif job.state is not JobState.QUEUED:
        job.transition(JobState.QUEUED)
    try:
        job.transition(JobState.RUNNING, owner=owner)
    except TransitionError:  # checked against job.json: another process took it a moment ago
        if job.live_runner() is not None:
            raise JobBusy(job) from None
        raise


def release_orphaned(job: JobDir, owner: str | None = None) -> None:
    """Put a job whose orchestrator died while running it back to QUEUED (for `owner`, if given): its
    running attempts closed as interrupted, the stage workers they recorded stopped if they still run."""
    for pid in job.interrupt_running_attempts("its orchestrator stopped"):
        kill_orphan(pid, str(job.path))
    job.transition(JobState.QUEUED, owner=owner)


def pending_stages(job: JobDir, hooks: JobHooks) -> list[Stage]:
    """The stages left to run: from the first one whose outputs fail to verify to the end.

    Stages before it are reported as skipped; it and every later stage are invalidated, since
    later outputs derive from earlier ones.
    """
    first = first_unfinished(job)
    for stage in STAGE_ORDER[:first]:
        job.mark_skipped(stage)
        hooks.listener(StageEvent(stage.value, StageEventKind.SKIPPED))
    for stage in STAGE_ORDER[first:]:
        job.invalidate(stage)
    return list(STAGE_ORDER[first:])


def first_unfinished(job: JobDir) -> int:
    """Index in STAGE_ORDER of the job's first stage whose outputs do not verify (len if none)."""
    return next((i for i, stage in enumerate(STAGE_ORDER) if not job.has_outputs(stage)), len(STAGE_ORDER))


class PublishFailed(JobStopped):
    """Every stage succeeded but the MP4 could not be copied out (full, read-only or missing
    output folder); the job is FAILED and its video stays in the job directory."""

    def __init__(self, job: JobDir, error: OSError, folder: Path) -> None:
        failure = Failure.NO_SPACE if is_no_space(error) else Failure.INVALID_INPUT
        where = failed_folder(error, folder)
        reason = (
            f"cannot publish the video to {where}: {error.strerror or error}; it is kept in the job, "
            f"recover it with: ltx2 decode --input {job.path} --output PATH.mp4"
        )
        outcome = StageOutcome(0, failure, reason, "", 0.0)
        super().__init__(STAGE_ORDER[-1], outcome, Decision(None, JobState.FAILED, reason))
        self.args = (reason,)

    def __str__(self) -> str:
        return self.reason


def failed_folder(error: OSError, folder: Path) -> Path:
    """The folder a publish could not write: where its file was going (a copy's error names the
    job's file it read first and the destination second), else the output folder."""
    name = error.filename2 or error.filename
    return Path(name).parent if name else folder


def finish_job(job: JobDir, settings: Settings, hooks: JobHooks, target: Path | None = None) -> Path:
    """Publish a job whose stages all succeeded, mark it done, flush caches if asked; the MP4's path.

    A cancel that came in after the last stage's worker ended still wins until publishing begins
    (the job ends CANCELLED, JobStopped); from then on it is answered "too late" (JobDir.request_cancel).
    A publish that fails (the output folder is full, read-only or gone) ends the job FAILED with
    the command that recovers the video (PublishFailed); it is never left RUNNING.
    """
    fault_point("job.before_publish", job_id=job.id, job_name=job.spec.name)
    if not job.commit_to_finish():
        outcome = StageOutcome(0, Failure.CANCELLED, CANCEL_REASON, "", 0.0)
        raise end_job(job, STAGE_ORDER[-1], outcome, Decision(None, JobState.CANCELLED, CANCEL_REASON))
    fault_point("job.publishing", job_id=job.id, job_name=job.spec.name)
    try:
        output = publish_job(job, settings.output_dir, target)
    except OSError as exc:
        failed = PublishFailed(job, exc, target.parent if target else settings.output_dir)
        job.transition(JobState.FAILED, error=failed.reason)
        raise failed from exc
    job.transition(JobState.DONE, output=str(output))
    try:  # a render of exactly its request is found again by its digest (`--reuse`)
        reuse.remember(job, settings.state_dir)
    except OSError as exc:  # the video is out; only a later --reuse misses it
        job.log_event(EventKind.WARNING, message=f"not indexed for --reuse: {exc}")
    if job.spec.drop_caches and (warning := drop_page_cache()):
        job.log_event(EventKind.WARNING, message=warning)
        hooks.listener(StageEvent("publish", StageEventKind.WARNING, 0, warning))
    return output


def next_attempt(job: JobDir, stage: Stage, settings: Settings) -> tuple[int, dict[str, Any]]:
    """(number, plan) of a stage's next attempt.

    A stage whose last attempt failed or was interrupted resumes with that attempt's plan (a
    lower-memory plan found earlier stays); otherwise the plan comes from the spec, so a re-run
    after changing decode settings (`ltx2 decode --vae-chunk-frames`) uses the new ones.
    """
    previous = job.stage_record(stage).attempts
    if previous and previous[-1].result not in (AttemptResult.OK, AttemptResult.CANCELLED):
        return len(previous) + 1, previous[-1].plan
    return len(previous) + 1, initial_plan(stage, job.spec, settings, job.deterministic)


def run_stage_until_done(
    job: JobDir,
    stage: Stage,
    settings: Settings,
    link: WorkerLink,
    hooks: JobHooks,
    prestarted: SpawnedWorker | None = None,
    following: Stage | None = None,
    history: tuple[Attempt, ...] = (),
) -> SpawnedWorker | None:
    """Attempt a stage until it succeeds (returns the next stage's prestarted worker) or the policy
    ends the job (JobStopped). `history` holds attempts this run already made elsewhere (a failed
    stage-major group attempt), so the policy sees them."""
    fault_point("job.before_stage", job_id=job.id, job_name=job.spec.name, stage=stage.value)
    attempts = list(history)
    plan = next_attempt(job, stage, settings)[1]
    next_worker: SpawnedWorker | None = None

    def prestart_following() -> None:
        nonlocal next_worker
        if following is not None and next_worker is None and link.prestarts:
            next_worker = spawn_worker(
                job, following, *next_attempt(job, following, settings), link, settings.heartbeat_s
            )

    try:
        while True:
            if why := hooks.should_stop():  # no worker is started for a job already told to stop
                outcome = StageOutcome(0, why, "stopped before the stage started", "", 0.0)
            else:
                adopted, prestarted = prestarted, None  # the attempt adopts it or stops it
                outcomes = run_attempt([job], stage, plan, settings, link, lambda _: hooks, adopted, prestart_following)
                outcome = outcomes.get(job.id) or StageOutcome(
                    0, Failure.INTERRUPTED, "stopped with its group", "", 0.0
                )
            if outcome.ok:
                handed_over, next_worker = next_worker, None
                return handed_over
            attempts.append(Attempt(plan, outcome.failure))
            decision = decide(stage, attempts, outcome.reason, job.spec, settings)
            if decision.plan is None:
                raise end_job(job, stage, outcome, decision)
            plan = decision.plan
    finally:
        # The worker started ahead for this stage, if no attempt took it (the job was stopped
        # before the stage began), and the one started for the next stage, if this one never ended
        # well: each waits for a GO that will not come.
        discard_worker(prestarted, link)
        discard_worker(next_worker, link)


def end_job(job: JobDir, stage: Stage, outcome: StageOutcome, decision: Decision) -> JobStopped:
    """Move the job to the state the policy decided; returns the JobStopped for the caller to raise."""
    assert decision.job_state is not None
    job.transition(decision.job_state, error=decision.reason)
    return JobStopped(stage, outcome, decision)


def drop_page_cache() -> str:
    """Flush the kernel page cache (needs root); returns a warning, or "" when it worked.

    Only called after the job's last file is written: on unified-memory machines model weights
    can still be backed by cached pages while a model is alive, and every model is gone by then.
    """
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as exc:
        return f"warning: --drop-caches: could not drop the page cache ({exc.strerror}); needs root"
    return ""
